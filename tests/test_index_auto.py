"""``--index-preset auto``: the faiss structure follows the collection's size and a memory
budget, switching at a checkpoint (rebuilt, trained, written atomically) as it grows.

The thresholds are lowered so that a few thousand 32-d vectors cross them all: exact, then
HNSW, then HNSW over 8-bit codes, then IVF-PQ; search results are checked before and after
each switch, and a reader opening the index loads the structure that was built.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from index_helpers import DESCRIPTOR, D, images, unit

from lookalike.index import IndexConf, IndexStore
from lookalike.index.backends import faiss_backend
from lookalike.index.backends.faiss_backend import auto_structure, auto_switch
from lookalike.index.conf import INDEX_PRESETS
from lookalike.index.conf import IndexConf as Conf


def test_auto_structure_grows_with_the_collection_and_shrinks_with_the_budget() -> None:
    gib = 1 << 30
    seen = [auto_structure(n, 256, gib) for n in (1_000, 100_000, 3_000_000, 10_000_000)]
    assert seen == ["Flat", "IVF1024,Flat", "IVF8192,SQ8", "IVF16384,PQ64"]
    # a smaller budget moves to compressed codes sooner; codes use what the budget leaves
    assert auto_structure(100_000, 256, 64 << 20) == "IVF1024,SQ8"
    assert auto_structure(1_000_000, 256, 100 << 20) == "IVF4096,PQ64"
    assert auto_structure(1_000_000, 256, 20 << 20) == "IVF4096,PQ8"
    # IVF lists: a power of two with 40 training vectors each
    for n in (70_000, 1_000_000, 10_000_000):
        nlist = int(auto_structure(n, 256, gib)[3:].split(",")[0])
        assert nlist & (nlist - 1) == 0 and 40 * nlist <= n
    assert INDEX_PRESETS["auto"].factory == "auto"


def test_auto_switches_out_of_a_structure_it_has_outgrown() -> None:
    gib = 1 << 30
    # 1M 256-d vectors in 1 GiB: float lists, 4% under the switch to 8-bit codes; exact
    # search (the structure an index starts in) is far behind and must not stay
    assert auto_switch("Flat", 1_000_000, 256, gib) == "IVF4096,Flat"
    assert auto_switch("IVF4096,Flat", 1_000_000, 256, gib) is None
    assert auto_switch("IVF4096,Flat", 1_050_000, 256, gib) is None  # within the margin
    assert auto_switch("IVF4096,Flat", 1_200_000, 256, gib) == "IVF4096,SQ8"
    assert auto_switch("IVF4096,SQ8", 1_000_000, 256, gib) is None  # shrinking: no flapping
    assert auto_switch("IVF4096,SQ8", 800_000, 256, gib) == "IVF4096,Flat"


def test_the_budget_is_recorded_only_for_auto() -> None:
    assert "memory_budget" not in Conf().to_dict()
    auto = Conf(factory="auto", memory_budget=123456)
    assert Conf.from_dict(auto.to_dict()) == auto
    with pytest.raises(Exception, match="memory_budget"):
        Conf(factory="auto", memory_budget=0)


def structure(store: IndexStore) -> str:
    return store.stats()["structure"]


def self_hits(store: IndexStore, x: np.ndarray, ids: list[int]) -> float:
    """The fraction of stored vectors found first when searched with themselves."""
    _, found = store.search(x, 1)
    return float(np.mean(found[:, 0] == np.asarray(ids)))


def test_auto_switches_structure_at_checkpoints(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(faiss_backend, "AUTO_EXACT_FLOATS", 300 * D)  # exact up to 300
    budget = 1_000_000  # bytes: float vectors up to 7,352 32-d vectors, SQ8 up to 25,000
    x = unit(30_000, seed=3)
    conf = IndexConf(factory="auto", memory_budget=budget, nprobe=64)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
        ids: list[int] = []
        steps = []
        # (size, self-matches found first at least): 32-d noise is IVF's worst case
        for end, found in ((200, 1.0), (1_000, 1.0), (12_000, 0.5), (30_000, 0.2)):
            ids += store.add(images(end - len(ids), prefix=f"/p{end}"), x[len(ids) : end])
            before = structure(store)
            store.checkpoint()
            steps.append((before, structure(store)))
            assert self_hits(store, x[:end], ids) >= found
        assert store.manifest.index == conf  # the setting stays "auto"; the structure moves
        expected = store.search(x[:500], 10)[1]
    assert steps == [
        ("auto: Flat", "auto: Flat"),
        ("auto: Flat", "auto: IVF16,Flat"),
        ("auto: IVF16,Flat", "auto: IVF256,SQ8"),
        ("auto: IVF256,SQ8", "auto: IVF512,PQ16"),
    ]
    with IndexStore.open(root) as reader:  # the checkpoint holds the structure built
        assert structure(reader) == "auto: IVF512,PQ16"
        assert np.array_equal(reader.search(x[:500], 10)[1], expected)


def test_auto_does_not_flap_at_a_threshold(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(faiss_backend, "AUTO_EXACT_FLOATS", 300 * D)
    x = unit(310, seed=4)
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(factory="auto")) as store:
        store.add(images(310), x)  # 310 > 300, but within 10% of the threshold
        store.checkpoint()
        assert structure(store) == "auto: Flat"


def test_cli_index_preset_auto_with_a_budget(make_images, tmp_path: Path, capsys) -> None:
    from lookalike.cli import main

    folder = make_images(6)[0].parent
    index = tmp_path / "auto.idx"
    rc = main(["index", str(folder), "--index", str(index), "--index-preset", "auto",
               "--memory-budget", "64MB", "--json"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["info", "--index", str(index), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index_conf"]["factory"] == "auto"
    assert info["index_conf"]["memory_budget"] == 64 << 20
    assert info["backend"]["structure"] == "auto: Flat"
    assert (
        main(["index", str(folder), "--index", str(tmp_path / "x"), "--memory-budget", "lots"]) == 2
    )


def test_a_reader_of_a_compressed_structure_never_reads_the_vectors(root: Path, monkeypatch):
    """Searching a trained IVF-PQ loads its checkpoint (codes) only: the float32 vectors stay
    on disk (memory-mapped, read where something needs them: DBA, rebuilds)."""
    from lookalike.index.vectors import VectorFile

    x = unit(2_000, seed=5)
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(factory="IVF16,PQ8")) as store:
        ids = store.add(images(len(x)), x)
        store.checkpoint()  # trained: 2,000 >= 1,000
        assert store.stats()["structure"] == "IVF16,PQ8"

    def refuse(*args, **kwargs):
        raise AssertionError("the vectors file was read")

    monkeypatch.setattr(VectorFile, "read", refuse)
    monkeypatch.setattr(VectorFile, "map", refuse)
    with IndexStore.open(root) as reader:
        reader.set_search_params(nprobe=16)
        _, found = reader.search(x[:50], 5)
    assert np.mean(found[:, 0] == np.asarray(ids[:50])) >= 0.5
