"""The Milvus backend (Milvus Lite in temporary directories): the backend conformance suite,
a full ``lookalike index --backend milvus`` against faiss, filtered search, relabelling, and
a writer SIGKILLed between its SQLite commit and its Milvus write.

The conformance tests are those of ``test_index_backends.py``, run here on a fresh
collection per test (:class:`FreshCollections`): a Milvus checkpoint names its collection
rather than copying it, so the suite's shared checkpoints would carry one test's changes
into the next. The index-level tests of every backend (``test_index_store.py``,
``test_index_durability.py``) run on Milvus too, through ``index_helpers.BACKEND_CONFS``.
"""

from __future__ import annotations

import gc
import json
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import test_index_backends as suite
from conftest import distinct_image
from index_helpers import DESCRIPTOR, D, run_python, unit

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexConf, IndexStore, NewImage
from lookalike.index.backends import (
    BackendSite,
    MilvusBackend,
    build_backend,
    checkpoint_name,
    create_backend,
    validate_conf,
)
from lookalike.index.backends import milvus_backend as mb
from lookalike.index.backends import milvus_client as mc

pytestmark = pytest.mark.skipif(mc.unavailable() is not None, reason=str(mc.unavailable()))

N = suite.N
IDS = suite.IDS
# structure -> None (exact: the reference's ids and scores) or the least recall@10
MILVUS_FACTORIES = {
    "FLAT": None,
    "HNSW:M=32,efConstruction=200": 0.9,
    "IVF_FLAT:nlist=16": None,  # nprobe 16 of 16 lists: every vector is compared
    "IVF_SQ8:nlist=16": 0.8,  # 8-bit codes: approximate scores
}
CASES = [
    pytest.param(IndexConf(factory=f, backend="milvus"), recall, id=f"milvus-{f.split(':')[0]}")
    for f, recall in MILVUS_FACTORIES.items()
]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return suite.unit(N, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return suite.unit(50, seed=7)


class FreshCollections(Mapping):
    """``conf -> checkpoint`` of a collection built from ``data`` for that lookup alone
    (scratch Milvus Lite), flushed so that its rows are indexed; what the suite's
    ``checkpoints`` fixture is for the backends that copy their data into a checkpoint."""

    def __init__(self, data: np.ndarray, folder: Path) -> None:
        self.data, self.folder, self.built = data, folder, []

    def __getitem__(self, conf: IndexConf) -> Path:
        backend = build_backend(conf, suite.D, IDS, lambda rows: self.data[rows])
        path = self.folder / checkpoint_name(conf, len(self.built))
        backend.save(path)
        self.built.append(backend)  # keeps its scratch Lite directory alive
        return path

    def __iter__(self) -> Iterator[IndexConf]:
        return iter(p.values[0] for p in CASES)

    def __len__(self) -> int:
        return len(CASES)


@pytest.fixture
def checkpoints(
    data: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FreshCollections]:
    fresh = FreshCollections(data, tmp_path_factory.mktemp("fresh"))
    yield fresh
    for backend in fresh.built:
        backend.close()


# -- the conformance suite ------------------------------------------------------------------


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_build_matches_reference(conf, least_recall, data, queries, checkpoints) -> None:
    suite.test_build_matches_reference(conf, least_recall, data, queries, checkpoints)


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_remove_update_add_retain_match_reference(
    conf, least_recall, data, queries, checkpoints
) -> None:
    suite.test_remove_update_add_retain_match_reference(
        conf, least_recall, data, queries, checkpoints
    )


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_save_load_round_trip(conf, least_recall, data, queries, checkpoints, tmp_path) -> None:
    # an approximate structure answers exactly until Lite has built its index in the
    # background, so the saved and the loaded backend may differ there: recall is checked
    suite.test_save_load_round_trip(
        conf, least_recall, data, queries, checkpoints, tmp_path, identical=least_recall is None
    )


@pytest.mark.parametrize(("conf", "least_recall"), CASES[:1])
def test_search_contract_on_small_and_empty(conf, least_recall) -> None:
    suite.test_search_contract_on_small_and_empty(conf, least_recall)


def test_k_beyond_the_milvus_limit_is_exact(data: np.ndarray, monkeypatch) -> None:
    backend = build_backend(IndexConf(backend="milvus"), suite.D, IDS, lambda rows: data[rows])
    q = suite.unit(3, seed=9)
    limited = backend.search(q, 20)
    monkeypatch.setattr(mb, "MAX_TOPK", 5)  # k = 20 is now beyond it: ranked here
    exact = backend.search(q, 20)
    np.testing.assert_array_equal(exact[1], limited[1])
    np.testing.assert_allclose(exact[0], limited[0], atol=1e-5)
    scores, found = backend.search(q, N + 5)
    suite.check_contract(scores, found, 3, N + 5)
    assert (found[:, N:] == -1).all() and set(found[0, :N].tolist()) == set(IDS.tolist())
    backend.close()


# -- structures, settings, places ----------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("FLAT", ("FLAT", {})),
        ("Flat", ("FLAT", {})),  # the default factory, so `--backend milvus` alone works
        ("HNSW", ("HNSW", {"M": 32, "efConstruction": 200})),
        ("HNSW32", ("HNSW", {"M": 32, "efConstruction": 200})),  # the `hnsw` preset
        ("hnsw:M=8,efConstruction=64", ("HNSW", {"M": 8, "efConstruction": 64})),
        ("IVF1024,Flat", ("IVF_FLAT", {"nlist": 1024})),  # the `ivf` preset
        ("IVF_SQ8:nlist=64", ("IVF_SQ8", {"nlist": 64})),
    ],
)
def test_parse_factory(factory: str, expected: tuple) -> None:
    structure = mc.parse_factory(factory)
    assert (structure.index_type, structure.build_params) == expected


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("IVF1024,PQ32", "builds FLAT, HNSW, IVF_FLAT, IVF_SQ8"),
        ("DISKANN", "builds FLAT"),
        ("HNSW:ef=10", "takes M, efConstruction, not 'ef'"),
        ("HNSW:M=1", r"M must be in \[2, 2048\]"),
        ("IVF_FLAT:nlist", "key=integer"),
        ("FLAT:nlist=4", "takes no parameters"),
    ],
)
def test_bad_structures_are_refused(factory: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        validate_conf(IndexConf(factory=factory, backend="milvus"), 32)


def test_uris_and_tokens(tmp_path: Path, monkeypatch) -> None:
    validate_conf(IndexConf(backend="milvus", uri="http://milvus.example:19530"), 32)
    with pytest.raises(ConfigError, match=r"carries credentials.*--milvus-token-file"):
        validate_conf(IndexConf(backend="milvus", uri="http://root:Milvus@host:19530"), 32)
    with pytest.raises(ConfigError, match="must start with"):
        validate_conf(IndexConf(backend="milvus", uri="other/milvus.db"), 32)
    with pytest.raises(ConfigError, match="takes no uri"):
        validate_conf(IndexConf(uri="http://host:19530"), 32)
    conf = IndexConf(backend="milvus", uri="http://host:19530")
    assert IndexConf.from_dict(conf.to_dict()) == conf and "uri" not in IndexConf().to_dict()
    with pytest.raises(ConfigError, match="is empty"):
        (tmp_path / "empty").write_text("\n")
        mc.use_token_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        mc.use_token_file(tmp_path / "missing")
    (tmp_path / "token").write_text("root:Milvus\n")
    monkeypatch.delenv(mc.TOKEN_ENV, raising=False)
    mc.use_token_file(tmp_path / "token")
    assert mc._read_token(Path(mc.os.environ[mc.TOKEN_ENV])) == "root:Milvus"


# -- filtered search, scalar fields ----------------------------------------------------------


def test_filtered_search_runs_inside_milvus() -> None:
    x, ids = unit(60, seed=3), np.arange(60, dtype=np.int64) + 1
    labels = {int(i): ["cat", "dog", 'o"dd \\ label', ""][int(i) % 4] for i in ids}

    def fields(wanted: np.ndarray) -> dict[str, list[str]]:
        return {
            "label": [labels[int(i)] for i in wanted],
            "content_hash": [f"h{int(i)}" for i in wanted],
        }

    backend = create_backend(IndexConf(backend="milvus"), D, BackendSite(None, fields))
    backend.add(x, ids)
    q = unit(4, seed=5)
    for label in ("cat", "dog", 'o"dd \\ label'):
        members = np.array([i for i in ids if labels[int(i)] == label])
        expected = suite.brute_force(x[members - 1], members, q, 5)
        scores, found = backend.search(q, 5, label=label)
        np.testing.assert_array_equal(found, expected[1])
        np.testing.assert_allclose(scores, expected[0], atol=1e-5)
    scores, found = backend.search(q, 20, label="cat", expr='content_hash in ["h4", "h8"]')
    assert set(found[0, :2].tolist()) == {4, 8} and (found[:, 2:] == -1).all()
    assert (backend.search(q, 3, label="nobody")[1] == -1).all()
    backend.remove(np.array([4]))
    assert 4 not in backend.search(q, 60, label="cat")[1]
    backend.close()


def test_relabel_reaches_milvus_through_the_op_log(tmp_path: Path) -> None:
    x = unit(6, seed=2)
    records = [NewImage(f"/p/{i}.jpg", f"hash{i}", metadata={"label": "a"}) for i in range(6)]
    conf = IndexConf(backend="milvus")
    with IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, conf) as store:
        ids = store.add(records, x)
        store.checkpoint()
        store.set_metadata(ids[2], {"label": "b", "note": 1})
        store.set_metadata(ids[3], {"label": "a", "note": 2})  # same label: no op
        backend = store._current_view().backend  # the backend-level filtered search
        assert backend.search(x[2:3], 6, label="b")[1][0].tolist() == [ids[2]] + [-1] * 5
        assert ids[2] not in backend.search(x[2:3], 6, label="a")[1]
        assert store.manifest.checkpoint.seq == 6 and store._db.last_seq() == 8
    with IndexStore.open(tmp_path / "ix") as reader:  # replayed from the checkpoint
        backend = reader._current_view().backend
        assert backend.search(x[2:3], 1, label="b")[1][0, 0] == ids[2]


# -- an index built by the CLI, against faiss ----------------------------------------------


def test_cli_index_matches_faiss_flat(tmp_path: Path, capsys) -> None:
    from lookalike.cli import main

    folder = tmp_path / "photos"
    for i in range(10):
        (folder / ("red" if i < 5 else "blue")).mkdir(parents=True, exist_ok=True)
        distinct_image(i, 48).save(folder / ("red" if i < 5 else "blue") / f"img{i}.png")
    common = ["--preset", "fast", "--workers", "0", "-q", "--label-from", "folder"]
    milvus, faiss = tmp_path / "milvus.idx", tmp_path / "faiss.idx"
    assert main(["index", str(folder), "--index", str(milvus), "--backend", "milvus", *common]) == 0
    assert main(["index", str(folder), "--index", str(faiss), *common]) == 0
    capsys.readouterr()
    gc.collect()
    with IndexStore.open(faiss) as f, IndexStore.open(milvus) as m:
        assert m.conf.backend == "milvus" and m.manifest.checkpoint.file.startswith("milvus-")
        ids = [r.id for r in f.records("ok")]
        assert [r.id for r in m.records("ok")] == ids and len(ids) == 10
        queries = f.vectors(ids)
        np.testing.assert_array_equal(m.vectors(ids), queries)
        f_scores, f_ids = f.search(queries, 10)
        m_scores, m_ids = m.search(queries, 10)
        np.testing.assert_array_equal(m_ids, f_ids)
        assert np.abs(m_scores - f_scores).max() < 1e-5
        backend = m._current_view().backend
        red = {r.id for r in m.records("ok") if r.metadata.get("label") == "red"}
        found = backend.search(queries, 10, label="red")[1]
        assert set(found[found >= 0].tolist()) == red
        assert (found[:, 5:] == -1).all()
    gc.collect()
    assert main(["info", "--index", str(milvus), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    backend = info["backend"]
    assert (backend["backend"], backend["structure"], backend["live"]) == ("milvus", "FLAT", 10)
    assert backend["engine"]["engine"] == "milvus-lite"
    assert backend["engine"]["where"] == str((milvus / mc.LITE_NAME).resolve())
    assert backend["engine"]["load_state"] == "Loaded" and backend["engine"]["indexed_rows"] == 10
    assert main(["info", "--index", str(milvus)]) == 0
    out = capsys.readouterr().out
    assert "milvus: FLAT" in out and "milvus-lite" in out and "collection lookalike" in out


# -- SIGKILL between the SQLite commit and the Milvus write --------------------------------

KILLED_WRITER = """
import os, signal, sys
import numpy as np
from lookalike.index import IndexStore, NewImage
from lookalike.index.backends.milvus_backend import MilvusBackend

root, when = sys.argv[1], sys.argv[2]
x = np.random.default_rng(11).standard_normal((2, 32)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
store = IndexStore.open(root, writable=True)
store.add([NewImage("/new.jpg", "hnew", metadata={"label": "new"})], x[:1])  # committed
store.add([NewImage("/img/1.jpg", "hupd")], x[1:])  # an update, committed
store.remove([1])  # committed

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if when in ("first", "add"):
    MilvusBackend.add = die
if when in ("first", "remove"):
    MilvusBackend.remove = die
print("committed", flush=True)
store.checkpoint()  # replays the ops into Milvus: killed on its first (or a later) write
"""


@pytest.mark.parametrize("when", ["first", "remove"])
def test_sigkill_between_sqlite_and_milvus_is_repaired(tmp_path: Path, when: str) -> None:
    root = tmp_path / "ix"
    x = unit(8, seed=4)
    records = [NewImage(f"/img/{i}.jpg", f"h{i}", metadata={"label": "old"}) for i in range(8)]
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(backend="milvus")) as store:
        ids = store.add(records, x)
        store.checkpoint()
    gc.collect()  # the Lite server of this process stops with the last backend using it
    assert not mc._LITE_USERS
    child = run_python(KILLED_WRITER, str(root), when)
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    assert out.strip() == "committed"
    new = np.random.default_rng(11).standard_normal((2, 32)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    with IndexStore.open(root) as reader:
        assert reader.manifest.checkpoint.seq == len(ids)  # the child wrote no checkpoint
        live = {r.path: r.id for r in reader.records("ok")}
        assert ids[0] not in live.values() and len(reader) == 8
        backend = reader._current_view().backend
        assert len(backend) == 8
        scores, found = reader.search(new, 1)
        assert found[:, 0].tolist() == [live["/new.jpg"], live["/img/1.jpg"]]
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        assert ids[0] not in reader.search(x, 8)[1]  # removed: gone from Milvus too
        assert ids[1] not in reader.search(x[1:2], 8)[1][:, :1]  # its old vector answers no more
        assert backend.search(new[:1], 8, label="new")[1][0, 0] == live["/new.jpg"]
        assert live["/img/1.jpg"] not in backend.search(new[1:], 8, label="old")[1]


def test_a_second_process_is_refused_while_lite_is_open(tmp_path: Path) -> None:
    root = tmp_path / "ix"
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(backend="milvus")) as store:
        store.add([NewImage("/a.jpg")], unit(1))
        store.checkpoint()
        child = run_python(
            "import sys\nfrom lookalike.index import IndexStore\nIndexStore.open(sys.argv[1])",
            str(root),
        )
        _, err = child.communicate(timeout=120)
        assert child.returncode != 0
        assert "open in another process, and Milvus Lite admits one at a time" in err
        assert store.search(unit(1), 1)[1][0, 0] == 1  # this process still has it
    with pytest.raises(IndexStateError, match="not a directory lookalike made"):
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / mc.LITE_NAME).write_text("planted")
        create_backend(IndexConf(backend="milvus"), D, BackendSite(bad))


def test_checkpoint_names_the_collection_never_a_secret(tmp_path: Path) -> None:
    backend = create_backend(IndexConf(backend="milvus"), D, BackendSite(tmp_path))
    backend.add(unit(3), np.arange(3))
    path = tmp_path / "milvus-3.index"
    backend.save(path)
    data = json.loads(path.read_text())
    assert data["lite"] == mc.LITE_NAME and data["uri"] is None  # relative: the index moves
    assert (data["collection"], data["index_type"], data["dim"]) == ("lookalike", "FLAT", D)
    other = IndexConf(factory="HNSW", backend="milvus")
    with pytest.raises(mb.CheckpointError, match="another structure"):
        MilvusBackend.load(path, other, site=BackendSite(tmp_path))
    with pytest.raises(mb.CheckpointError, match="outside any index"):
        MilvusBackend.load(path, IndexConf(backend="milvus"))
    loaded = MilvusBackend.load(path, IndexConf(backend="milvus"), site=BackendSite(tmp_path))
    assert len(loaded) == 3
    loaded.close()
    backend.close()


def test_milvus_uri_is_a_setting_of_a_new_index(tmp_path: Path) -> None:
    from lookalike.indexing.settings import resolve_settings

    settings = resolve_settings(None, backend="milvus", milvus_uri="http://milvus.example:19530")
    assert settings.index == IndexConf(backend="milvus", uri="http://milvus.example:19530")
    IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, IndexConf(backend="milvus")).close()
    assert resolve_settings(tmp_path / "ix").index == IndexConf(backend="milvus")
    with pytest.raises(ConfigError, match="Milvus Lite inside it; --milvus-uri cannot move it"):
        resolve_settings(tmp_path / "ix", milvus_uri="http://milvus.example:19530")


def test_search_after_pytorch_metric_learning_patched_faiss(data: np.ndarray) -> None:
    """pytorch-metric-learning imports faiss.contrib.torch_utils (``lookalike train`` does),
    whose faiss methods drop the ``params`` keyword Milvus Lite's faiss indexes pass."""
    import faiss
    import faiss.contrib.torch_utils
    import torch

    backend = build_backend(
        IndexConf(backend="milvus", factory="HNSW:M=16,efConstruction=64"),
        suite.D,
        IDS,
        lambda rows: data[rows],
    )
    try:
        backend.build_indexes()  # searched through the HNSW index, not exactly
        _, found = backend.search(data[:5], 3)
        assert found[:, 0].tolist() == IDS[:5].tolist()
    finally:
        backend.close()
    flat = faiss.IndexFlatIP(4)  # the torch path still works for those who use it
    flat.add(np.eye(4, dtype=np.float32))
    _, ids = flat.search(torch.eye(4)[:2], 1)
    assert isinstance(ids, torch.Tensor) and ids[:, 0].tolist() == [0, 1]
