"""Faiss backends: every factory through build, remove, update, search params and reload.

Results are checked against a brute-force numpy inner product; the approximate structures
get recall thresholds instead of exact equality.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.index import INDEX_PRESETS, IndexConf, IndexStore, NewImage, validate_factory
from lookalike.index.backend import Backend, min_train_size
from lookalike.index.conf import faiss_message, get_index_conf

FACTORIES = ["Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ8"]
EXACT = {"Flat", "IVF16,Flat"}  # IVF16 with nprobe=16 visits every list
N, D = 2000, 32
DESCRIPTOR = {"model": "test", "pooling": "gem"}


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Top-k ids by inner product, computed plainly."""
    sims = q @ db.T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def self_recall(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean([e in row for e, row in zip(expected, found, strict=True)]))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return unit(N, seed=1)


def build(factory: str, x: np.ndarray, ids: np.ndarray, **kw: int) -> Backend:
    conf = IndexConf(factory=factory, **kw)
    return Backend.build(conf, x.shape[1], ids, lambda rows: x[rows])


@pytest.mark.parametrize("factory", FACTORIES)
def test_build_trains_and_finds_each_vector(factory: str, data: np.ndarray) -> None:
    ids = np.arange(N, dtype=np.int64) + 100
    backend = build(factory, data, ids)
    assert not backend.fallback and backend.index.is_trained
    assert backend.n_live == N and backend.n_dead == 0
    scores, found = backend.search(data[:200], 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (200, 10)
    if factory in EXACT:
        np.testing.assert_array_equal(found[:, 0], ids[:200])
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
        reference = brute_force(data, ids, data[:200], 10)
        assert np.mean(found == reference) > 0.99  # ties aside, identical rankings
    elif factory == "HNSW32":
        assert self_recall(found[:, :1], ids[:200]) >= 0.98
    else:  # 8-byte product codes of 32-d vectors: approximate scores
        assert self_recall(found, ids[:200]) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


@pytest.mark.parametrize("factory", FACTORIES)
def test_remove_and_update(factory: str, data: np.ndarray) -> None:
    ids = np.arange(N, dtype=np.int64)
    backend = build(factory, data, ids)
    removed = ids[:300]
    backend.remove(removed)
    backend.remove(np.array([10_000_000], dtype=np.int64))  # unknown: ignored
    assert backend.n_live == N - 300
    _, found = backend.search(data[:300], 10)
    assert not np.isin(found, removed).any()
    # update: id 500 gets a new vector; the old one must not answer for it any more
    new = unit(1, seed=99)
    backend.remove(np.array([500]))
    backend.add(new, np.array([500]))
    assert backend.n_live == N - 300
    _, found = backend.search(new, 5)
    assert found[0, 0] == 500
    _, found_old = backend.search(data[500:501], 3)
    if factory != "IVF16,PQ8":
        assert found_old[0, 0] != 500
    if factory == "HNSW32":
        assert not backend.removable and backend.n_dead == 301


@pytest.mark.parametrize("factory", FACTORIES)
def test_write_read_round_trip(factory: str, data: np.ndarray, tmp_path: Path) -> None:
    ids = np.arange(N, dtype=np.int64)
    backend = build(factory, data, ids, nprobe=4, ef_search=40)
    backend.remove(ids[:50])
    backend.write(tmp_path / "x.index")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = Backend.read(tmp_path / "x.index", IndexConf(factory=factory, nprobe=4, ef_search=40))
    loaded.retain(ids[50:])  # tombstones are re-derived from the live ids, not stored
    assert loaded.n_live == N - 50 and loaded.fallback is False
    np.testing.assert_array_equal(backend.search(data[:100], 5)[1], loaded.search(data[:100], 5)[1])


def test_search_params_applied(data: np.ndarray) -> None:
    ivf = build("IVF16,Flat", data, np.arange(N), nprobe=3)
    assert faiss.extract_index_ivf(ivf.index).nprobe == 3
    hnsw = build("HNSW32", data, np.arange(N), ef_search=77)
    assert faiss.downcast_index(hnsw.index.index).hnsw.efSearch == 77


def test_fallback_until_enough_vectors(data: np.ndarray) -> None:
    assert min_train_size(faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)) == 1000
    assert min_train_size(faiss.index_factory(D, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)) == 2560
    small = build("IVF16,PQ8", data[:100], np.arange(100))
    assert small.fallback and small.n_live == 100
    _, found = small.search(data[:100], 1)  # exact while untrained
    np.testing.assert_array_equal(found[:, 0], np.arange(100))
    empty = Backend.empty(IndexConf(factory="IVF16,Flat"), D)
    assert empty.fallback and empty.n_live == 0
    assert not Backend.empty(IndexConf(factory="HNSW32"), D).fallback


def test_search_padding_and_empty(data: np.ndarray) -> None:
    backend = build("HNSW32", data[:3], np.arange(3))
    backend.remove(np.array([1]))
    scores, found = backend.search(data[:2], 5)
    assert found.shape == (2, 5)
    assert set(found[0, :2].tolist()) == {0, 2} and (found[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()
    scores, found = Backend.empty(IndexConf(), D).search(data[:2], 4)
    assert (found == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("factory", FACTORIES)
def test_store_lifecycle(factory: str, data: np.ndarray, tmp_path: Path) -> None:
    """Through the store: train at checkpoint, remove, update, checkpoint, reopen."""
    conf = IndexConf(factory=factory, nprobe=16, ef_search=64)
    store = IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, conf)
    ids = np.array(store.add([NewImage(f"/img/{i}.jpg") for i in range(N)], data))
    store.checkpoint()
    assert store.manifest["checkpoint"]["fallback"] is False
    store.remove(ids[:100].tolist())
    new = unit(10, seed=7)
    same = store.add([NewImage(f"/img/{i}.jpg") for i in range(100, 110)], new)
    assert same == ids[100:110].tolist()
    _, found = store.search(data[:100], 10)
    assert not np.isin(found, ids[:100]).any()
    _, found_new = store.search(new, 1)
    np.testing.assert_array_equal(found_new[:, 0], ids[100:110])
    before = store.search(data[200:400], 5)[1]
    store.checkpoint()
    store.close()
    with IndexStore.open(tmp_path / "ix") as reader:
        np.testing.assert_array_equal(reader.search(data[200:400], 5)[1], before)
        backend = reader._view.backend
        if factory == "HNSW32":  # tombstones re-derived: 100 removed + 10 replaced
            assert backend.n_dead == 110
            assert faiss.downcast_index(backend.index.index).hnsw.efSearch == 64
        if factory.startswith("IVF"):
            assert faiss.extract_index_ivf(backend.index).nprobe == 16
        assert backend.n_live == len(reader) == N - 100


def test_checkpoint_trains_once_enough(data: np.ndarray, tmp_path: Path) -> None:
    store = IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, IndexConf(factory="IVF16,Flat"))
    store.add([NewImage(f"/a/{i}") for i in range(500)], data[:500])
    store.checkpoint()
    assert store.manifest["checkpoint"]["fallback"] is True
    early = IndexStore.open(tmp_path / "ix")
    assert early._view.backend.fallback
    store.add([NewImage(f"/b/{i}") for i in range(500, N)], data[500:])
    store.checkpoint()
    assert store.manifest["checkpoint"]["fallback"] is False
    store.close()
    early.refresh()  # reloads to pick up the trained structure
    assert not early._view.backend.fallback and len(early) == N
    early.close()
    with IndexStore.open(tmp_path / "ix") as reader:
        assert not reader._view.backend.fallback
        _, found = reader.search(data[:50], 1)
        np.testing.assert_array_equal(found[:, 0], np.arange(1, 51))


def test_tombstoned_structure_rebuilt_at_checkpoint(data: np.ndarray, tmp_path: Path) -> None:
    store = IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, IndexConf(factory="HNSW32"))
    ids = store.add([NewImage(f"/a/{i}") for i in range(400)], data[:400])
    store.remove(ids[:200])
    store.search(data[:1], 1)
    assert store._view.backend.n_dead == 200
    store.checkpoint()  # half dead: rebuilt without tombstones
    assert store._view.backend.n_dead == 0 and store._view.backend.n_live == 200
    store.close()


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF1024,PQ32", "PCA16,IVF16,SQ8"])
def test_validate_factory_accepts(factory: str) -> None:
    validate_factory(factory, 64)


@pytest.mark.parametrize(
    ("factory", "dim", "fragment"),
    [
        ("IVFbogus", 32, "could not parse"),
        ("PQ7", 32, "multiple of the number of subquantizers"),
        ("IDMap,Flat", 32, "drop the 'IDMap,' prefix"),
        ("Flat", 0, "dimension must be >= 1"),
    ],
)
def test_validate_factory_rejects(factory: str, dim: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_factory(factory, dim)
    assert fragment in str(info.value)
    assert "Error in" not in str(info.value)  # faiss's C++ location is stripped


@pytest.mark.parametrize("name", sorted(INDEX_PRESETS))
def test_presets_are_valid(name: str) -> None:
    validate_factory(get_index_conf(name).factory, 1280)


def test_unknown_preset_and_bad_conf() -> None:
    with pytest.raises(ConfigError, match="exact"):
        get_index_conf("fastest")
    with pytest.raises(ConfigError, match="nprobe"):
        IndexConf(nprobe=0)
    with pytest.raises(ConfigError, match="ef_search"):
        IndexConf(ef_search=0)
    error = RuntimeError("Error in void f() at /x/y.cpp:12: Error: 'a' failed: boom")
    assert faiss_message(error) == "'a' failed: boom"
