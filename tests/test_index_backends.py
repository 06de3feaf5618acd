"""Vector backends: every registered one held to the numpy reference, then faiss's own parts.

Each backend (and, for faiss, exact and approximate factories) goes through build, add,
remove, update (remove + add), retain, search and save / load, and is compared after each
step with a :class:`NumpyBackend` that went through the same steps (itself checked against a
brute-force inner product). Exact structures must give the reference's ids and scores;
approximate ones keep recall thresholds. The vectors are random, so there are no ties
(:func:`assert_same` checks the gaps it relies on).

A backend whose vectors live in an outside engine (``EXTERNAL``: Milvus) is held to the same
tests in its own module (``tests/test_milvus_backend.py``), on a fresh collection per test:
its checkpoints name a collection rather than copy it, so the shared ones here would let one
test's changes reach the next.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from index_helpers import brute_force

from lookalike.errors import ConfigError
from lookalike.index import INDEX_PRESETS, IndexConf, IndexStore, NewImage, validate_factory
from lookalike.index.backends import (
    BACKENDS,
    EXTERNAL,
    CheckpointError,
    NumpyBackend,
    VectorBackend,
    build_backend,
    checkpoint_name,
    create_backend,
    is_checkpoint_name,
    load_backend,
    validate_conf,
)
from lookalike.index.backends.faiss_backend import min_train_size
from lookalike.index.backends.milvus_client import unavailable
from lookalike.index.conf import BACKEND_NAMES, faiss_message, get_index_conf

N, D = 1000, 32
DESCRIPTOR = {"model": "test", "pooling": "gem"}
IDS = 3 * np.arange(N, dtype=np.int64) + 100  # not row numbers: id/position mix-ups show
# faiss factories: None for exact structures (IVF16 with nprobe=16 visits every list), else
# the least recall of the reference's top 10 (8-byte product codes of 32-d vectors: ~0.6)
FAISS_FACTORIES = {"Flat": None, "IVF16,Flat": None, "HNSW32": 0.9, "IVF16,PQ8": 0.5}
FACTORIES = list(FAISS_FACTORIES)
SCORE_ATOL = 1e-5  # faiss and numpy sum the same float32 products in different orders
MIN_GAP = 1e-6  # the reference's neighbouring scores differ by more: rankings are unique


def engine(name: str) -> list:
    """The marks of a test of backend ``name``: skipped where its engine is not installed."""
    reason = unavailable() if name in EXTERNAL else None
    return [pytest.mark.skip(reason=reason)] if reason else []


BACKEND_PARAMS = [pytest.param(name, marks=engine(name), id=name) for name in BACKENDS]


def _cases() -> list:
    cases = []
    for name in BACKENDS:  # a newly registered backend is held to the reference as exact
        if name in EXTERNAL:
            continue  # tests/test_milvus_backend.py
        factories = FAISS_FACTORIES if name == "faiss" else {"Flat": None}
        for factory, least_recall in factories.items():
            conf = IndexConf(factory=factory, backend=name)
            cases.append(pytest.param(conf, least_recall, id=f"{name}-{factory}"))
    return cases


CASES = _cases()


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def self_recall(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean([e in row for e, row in zip(expected, found, strict=True)]))


def recall(found: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of the reference's neighbours the backend returned."""
    pairs = zip(found, reference, strict=True)
    hits = [len(set(f.tolist()) & set(r[r >= 0].tolist())) for f, r in pairs]
    return sum(hits) / max(1, int((reference >= 0).sum()))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return unit(N, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return unit(50, seed=7)  # 50 > 16: faiss's own search; a few of them: the BLAS path


@pytest.fixture(scope="module")
def checkpoints(data: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each case built once from all the data (training included), saved; tests load copies."""
    folder = tmp_path_factory.mktemp("checkpoints")
    saved = {}
    for param in CASES:
        conf = param.values[0]
        backend = build_backend(conf, D, IDS, lambda rows: data[rows])
        path = folder / checkpoint_name(conf, len(saved))
        backend.save(path)
        saved[conf] = path
    return saved


def built(conf: IndexConf, checkpoints: dict) -> VectorBackend:
    backend = load_backend(checkpoints[conf], conf)
    backend.retain(IDS)
    return backend


def reference(x: np.ndarray, ids: np.ndarray) -> NumpyBackend:
    backend = NumpyBackend.create(IndexConf(backend="numpy"), D)
    backend.add(x, ids)
    return backend


def check_contract(scores: np.ndarray, ids: np.ndarray, n: int, k: int) -> None:
    assert scores.shape == ids.shape == (n, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids == -1, np.isneginf(scores))  # padded together
    padded = ids == -1
    assert (np.sort(padded, axis=1) == padded).all()  # padding only after the results
    finite = np.where(np.isneginf(scores), -10.0, scores)  # below any inner product
    assert np.all(np.diff(finite, axis=1) <= 1e-6)  # best first


def assert_same(
    backend: VectorBackend,
    ref: NumpyBackend,
    q: np.ndarray,
    least_recall: float | None,
    k: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """The backend answers ``q`` like the reference: equal ids and scores for an exact
    structure (``least_recall`` None), else at least that recall of the reference's top
    ``k``, and only live ids."""
    assert len(backend) == len(ref)
    scores, found = backend.search(q, k)
    check_contract(scores, found, len(q), k)
    ref_scores, ref_ids = ref.search(q, k + 1)
    if least_recall is None:
        assert np.diff(-ref_scores, axis=1).min() > MIN_GAP  # no ties: one right ranking
        np.testing.assert_array_equal(found, ref_ids[:, :k])
        np.testing.assert_allclose(scores, ref_scores[:, :k], atol=SCORE_ATOL)
    else:
        assert recall(found, ref_ids[:, :k]) >= least_recall
        assert np.isin(found[found >= 0], ref._ids).all()  # only live ids, never a removed one
    return scores, found


# -- the registry and the reference -------------------------------------------------------


def test_registry_matches_the_conf_names() -> None:
    assert tuple(BACKENDS) == BACKEND_NAMES
    from lookalike.cli.options import BACKEND_CHOICES

    assert BACKEND_CHOICES == BACKEND_NAMES
    for name, cls in BACKENDS.items():
        assert cls.name == name
        if engine(name):
            continue  # not installed
        backend = create_backend(IndexConf(backend=name), D)
        assert isinstance(backend, VectorBackend) and backend.dim == D and len(backend) == 0
        assert backend.stats()["backend"] == name
        assert is_checkpoint_name(checkpoint_name(IndexConf(backend=name), 12))
    assert not is_checkpoint_name("faiss-12.index.tmp") and not is_checkpoint_name("x-1.index")
    assert not is_checkpoint_name("faiss-.index")
    with pytest.raises(ConfigError, match="unknown vector backend 'annoy'; choose one of faiss"):
        IndexConf(backend="annoy")


def test_reference_is_a_plain_brute_force(data: np.ndarray, queries: np.ndarray) -> None:
    live = dict(zip(IDS.tolist(), data, strict=True))
    ref = reference(data, IDS)
    ref.remove(IDS[:100])
    ref.remove(np.array([7, 10**9]))  # unknown: ignored
    ref.add(unit(20, seed=3), 10**6 + np.arange(20))
    ref.retain(np.concatenate([IDS[50:1500], 10**6 + np.arange(10), [-4]]))
    for i in IDS[:100].tolist() + IDS[1500:].tolist():
        del live[i]
    live.update(zip((10**6 + np.arange(10)).tolist(), unit(20, seed=3)[:10], strict=True))
    ids = np.array(sorted(live))
    expected = brute_force(np.stack([live[i] for i in ids.tolist()]), ids, queries, 10)
    scores, found = ref.search(queries, 10)
    check_contract(scores, found, len(queries), 10)
    np.testing.assert_array_equal(found, expected[1])
    np.testing.assert_allclose(scores, expected[0], atol=1e-6)
    assert len(ref) == len(live) and ref.stats()["live"] == len(live)


def test_reference_add_requires_absent_ids(data: np.ndarray) -> None:
    ref = reference(data[:10], IDS[:10])
    with pytest.raises(ValueError, match="not present"):
        ref.add(data[:1], IDS[:1])
    with pytest.raises(ValueError, match="not present"):
        ref.add(data[:2], np.array([5, 5]))
    assert len(ref) == 10  # a refused add changes nothing
    ref.remove(IDS[:1])  # an update is remove, then add
    ref.add(data[1:2], IDS[:1])
    assert ref.search(data[1:2], 2)[1][0].tolist() in ([IDS[0], IDS[1]], [IDS[1], IDS[0]])


# -- every backend against the reference --------------------------------------------------


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_build_matches_reference(
    conf: IndexConf,
    least_recall: float | None,
    data: np.ndarray,
    queries: np.ndarray,
    checkpoints: dict,
) -> None:
    backend = built(conf, checkpoints)
    stats = backend.stats()
    assert stats["backend"] == conf.backend and stats["trained"] and backend.trained
    assert (stats["live"], stats["dead"]) == (N, 0) and stats["memory_bytes"] > 0
    assert set(stats) - {"engine"} == {
        "backend", "structure", "live", "dead", "trained", "memory_bytes", "search_params",
    }  # fmt: skip
    assert ("engine" in stats) == (conf.backend in EXTERNAL)
    ref = reference(data, IDS)
    scores, found = assert_same(backend, ref, queries, least_recall)
    few = backend.search(queries[:3], 10)  # faiss searches a few queries with one BLAS call
    np.testing.assert_array_equal(few[1], found[:3])
    np.testing.assert_allclose(few[0], scores[:3], atol=SCORE_ATOL)
    self_scores, self_found = backend.search(data[:200], 10)
    if least_recall is None or conf.factory == "HNSW32":
        assert self_recall(self_found[:, :1], IDS[:200]) >= 0.98
    else:  # 8-byte product codes of 32-d vectors: approximate scores
        assert self_recall(self_found, IDS[:200]) >= 0.9
    if least_recall is None:
        np.testing.assert_allclose(self_scores[:, 0], 1.0, atol=SCORE_ATOL)


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_remove_update_add_retain_match_reference(
    conf: IndexConf,
    least_recall: float | None,
    data: np.ndarray,
    queries: np.ndarray,
    checkpoints: dict,
) -> None:
    backend, ref = built(conf, checkpoints), reference(data, IDS)
    tombstones = conf.factory == "HNSW32"

    removed = np.concatenate([IDS[:300], [10**9, -7]])  # unknown ids are ignored
    for b in (backend, ref):
        b.remove(removed)
    assert len(backend) == N - 300
    assert_same(backend, ref, queries, least_recall)
    assert not np.isin(backend.search(data[:300], 10)[1], IDS[:300]).any()

    updated, new = IDS[300:310], unit(10, seed=99)  # an update: remove, then add
    for b in (backend, ref):
        b.remove(updated)
        b.add(new, updated)
    assert len(backend) == N - 300
    assert_same(backend, ref, queries, least_recall)
    np.testing.assert_array_equal(backend.search(new, 1)[1][:, 0], updated)
    if conf.factory != "IVF16,PQ8":  # the old vectors no longer answer for their ids
        assert not np.isin(backend.search(data[300:310], 1)[1], updated).any()

    added = 10**6 + np.arange(50, dtype=np.int64)
    for b in (backend, ref):
        b.add(unit(50, seed=5), added)
    assert len(backend) == N - 300 + 50
    assert_same(backend, ref, queries, least_recall)
    np.testing.assert_array_equal(backend.search(unit(50, seed=5), 1)[1][:, 0], added)

    keep = np.concatenate([IDS[400:], added[:25], [10**8]])  # an id never added: ignored
    for b in (backend, ref):
        b.retain(keep)
    assert len(backend) == N - 400 + 25
    _, found = assert_same(backend, ref, queries, least_recall)
    assert not np.isin(found, np.concatenate([IDS[:400], added[25:]])).any()
    if tombstones:  # removed, replaced and dropped positions stay in the graph, dead
        assert backend.stats()["dead"] == 300 + 10 + 90 + 10 + 25
    else:
        assert backend.stats()["dead"] == 0
    assert backend.stats()["live"] == len(ref)


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_save_load_round_trip(
    conf: IndexConf,
    least_recall: float | None,
    data: np.ndarray,
    queries: np.ndarray,
    checkpoints: dict,
    tmp_path: Path,
    identical: bool = True,
) -> None:
    """``identical``: the loaded backend answers exactly as the saved one (False for an
    engine whose approximate answers depend on when it builds its index: Milvus Lite)."""
    backend, ref = built(conf, checkpoints), reference(data, IDS)
    conf = IndexConf(conf.factory, nprobe=16, ef_search=40, backend=conf.backend)
    backend.set_search_params(conf)
    for b in (backend, ref):
        b.remove(IDS[:50])
        b.remove(IDS[60:65])
        b.add(unit(5, seed=8), IDS[60:65])
    path = tmp_path / checkpoint_name(conf, 65)
    backend.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no scratch file left
    loaded = load_backend(path, conf)
    loaded.retain(ref._ids)  # tombstones are re-derived from the live ids, not stored
    assert len(loaded) == len(backend) == N - 50 and loaded.trained
    assert loaded.stats()["search_params"] == backend.stats()["search_params"]
    scores, found = backend.search(queries, 10)
    loaded_scores, loaded_found = assert_same(loaded, ref, queries, least_recall)
    if identical:
        np.testing.assert_array_equal(loaded_found, found)
        np.testing.assert_allclose(loaded_scores, scores, atol=SCORE_ATOL)


@pytest.mark.parametrize(("conf", "least_recall"), CASES)
def test_search_contract_on_small_and_empty(conf: IndexConf, least_recall: float | None) -> None:
    q = unit(3, seed=2)
    empty = create_backend(conf, D)
    scores, found = empty.search(q, 4)
    check_contract(scores, found, 3, 4)
    assert (found == -1).all() and np.isneginf(scores).all()
    assert empty.search(q, 0)[1].shape == (3, 0) and empty.search(q, 0)[0].dtype == np.float32
    assert empty.search(np.empty((0, D), np.float32), 3)[1].shape == (0, 3)
    empty.remove(np.array([1, 2]))  # nothing to remove: fine
    assert len(empty) == 0

    x = unit(5, seed=4)
    small, ref = create_backend(conf, D), reference(x, np.arange(5) + 10)
    small.add(x, np.arange(5) + 10)  # a structure that needs training: its exact stand-in
    for k in (8, 5, 1):
        scores, found = small.search(q, k)
        check_contract(scores, found, 3, k)
        ref_scores, ref_ids = ref.search(q, k)
        np.testing.assert_array_equal(found, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=SCORE_ATOL)
    found = small.search(q, 8)[1]
    assert (found[:, 5:] == -1).all() and set(found[0, :5].tolist()) == set(range(10, 15))
    assert small.search(q, 0)[1].shape == (3, 0)
    small.retain(np.array([10, 11, 12, 13, 99]))  # as many ids as it holds, one unknown
    assert len(small) == 4 and 14 not in small.search(q, 5)[1]
    small.remove(np.array([10, 11, 12]))
    scores, found = small.search(q, 3)
    assert (found[:, 0] == 13).all() and (found[:, 1:] == -1).all()
    assert np.isneginf(scores[:, 1:]).all() and np.isfinite(scores[:, 0]).all()
    small.remove(np.array([13]))
    assert len(small) == 0 and (small.search(q, 2)[1] == -1).all()


# -- configuration and checkpoint errors ----------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "dim", "fragment"),
    [
        (IndexConf(backend="numpy", factory="HNSW32"), 32, "numpy backend searches exactly"),
        (IndexConf(backend="numpy", factory="IVF16,Flat"), 32, "use the faiss backend"),
        (IndexConf(factory="IDMap,Flat"), 32, "drop the 'IDMap,' prefix"),
        (IndexConf(factory="IDMap2,HNSW32"), 32, "drop the 'IDMap,' prefix"),
        (IndexConf(factory="IVFbogus"), 32, "could not parse"),
        (IndexConf(factory="PQ7"), 32, "multiple of the number of subquantizers"),
        (IndexConf(), 0, "dimension must be >= 1"),
        (IndexConf(backend="numpy"), 0, "dimension must be >= 1"),
    ],
)
def test_validate_conf_rejects(conf: IndexConf, dim: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_conf(conf, dim)
    assert fragment in str(info.value)
    assert "Error in" not in str(info.value)  # faiss's C++ location is stripped
    if dim > 0:
        with pytest.raises(ConfigError, match=fragment.split("'")[0]):
            create_backend(conf, dim)  # the backend checks the same itself


@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_garbage_checkpoint_is_a_checkpoint_error(name: str, tmp_path: Path) -> None:
    conf = IndexConf(backend=name)
    good = create_backend(conf, D)
    good.add(unit(20), np.arange(20))
    good.save(tmp_path / "good.index")
    data = (tmp_path / "good.index").read_bytes()
    other = next((n for n in BACKENDS if n != name), None)
    garbage = {
        "random": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "text": b"garbage, not a checkpoint",
    }
    if other is not None:  # another backend's checkpoint
        theirs = create_backend(IndexConf(backend=other), D)
        theirs.add(unit(3), np.arange(3))
        theirs.save(tmp_path / "theirs.index")
        garbage["other backend"] = (tmp_path / "theirs.index").read_bytes()
    for what, content in garbage.items():
        (tmp_path / "bad.index").write_bytes(content)
        with pytest.raises(CheckpointError):
            load_backend(tmp_path / "bad.index", conf)
            pytest.fail(f"{what} loaded")
    loaded = load_backend(tmp_path / "good.index", conf)
    assert len(loaded) == 20 and loaded.search(unit(1), 1)[1][0, 0] == 0


# -- faiss: tombstones, IVF ids, training, search parameters ----------------------------------


def faiss_built(factory: str, x: np.ndarray, ids: np.ndarray, **kw: int) -> VectorBackend:
    return build_backend(IndexConf(factory=factory, **kw), x.shape[1], ids, lambda rows: x[rows])


def test_hnsw_tombstones_are_per_position(data: np.ndarray, checkpoints: dict) -> None:
    conf = IndexConf(factory="HNSW32")
    backend = built(conf, checkpoints)
    assert not backend.removable and backend.n_dead == 0
    backend.remove(IDS[:100])
    backend.remove(IDS[:100])  # removing again changes nothing
    assert (backend.n_live, backend.n_dead) == (N - 100, 100)
    for seed in (1, 2):  # the same id updated twice: only its newest position is alive
        backend.remove(IDS[500:501])
        backend.add(unit(1, seed=100 + seed), IDS[500:501])
    assert (backend.n_live, backend.n_dead, backend.ntotal) == (N - 100, 102, N + 2)
    assert backend.search(unit(1, seed=102), 1)[1][0, 0] == IDS[500]
    _, found = backend.search(unit(1, seed=101), 5)
    assert IDS[500] not in found[0, :1]
    assert backend.wants_rebuild() is False  # below a quarter of the positions dead
    backend.remove(IDS[100 : N // 4])
    assert backend.n_dead == N // 4 + 2 and backend.wants_rebuild() is True


def test_ivf_keeps_its_own_ids(checkpoints: dict) -> None:
    backend = built(IndexConf(factory="IVF16,Flat"), checkpoints)
    assert not isinstance(backend.index, faiss.IndexIDMap2)  # IDMap2 + IVF breaks remove_ids
    assert backend.removable and faiss.extract_index_ivf(backend.index).ntotal == N
    backend.remove(IDS[::2])
    assert faiss.extract_index_ivf(backend.index).ntotal == N // 2 and backend.n_dead == 0


def test_search_params_applied(data: np.ndarray) -> None:
    ivf = faiss_built("IVF16,Flat", data, IDS, nprobe=3)
    assert ivf.stats()["search_params"] == {"nprobe": 3}
    assert faiss.extract_index_ivf(ivf.index).nprobe == 3
    ivf.set_search_params(IndexConf(factory="IVF16,Flat", nprobe=9))
    assert ivf.stats()["search_params"] == {"nprobe": 9}
    hnsw = faiss_built("HNSW32", data[:300], IDS[:300], ef_search=77)
    assert hnsw.stats()["search_params"] == {"ef_search": 77}
    assert create_backend(IndexConf(), D).stats()["search_params"] == {}
    assert create_backend(IndexConf(backend="numpy"), D).stats()["search_params"] == {}


def test_fallback_until_enough_vectors(data: np.ndarray) -> None:
    assert min_train_size(faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)) == 1000
    assert min_train_size(faiss.index_factory(D, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)) == 2560
    small = faiss_built("IVF16,PQ8", data[:100], IDS[:100])
    assert not small.trained and small.train_size == 1000 and len(small) == 100
    assert small.stats()["structure"] == "Flat (exact, until trained)"
    _, found = small.search(data[:100], 1)  # exact while untrained
    np.testing.assert_array_equal(found[:, 0], IDS[:100])
    with pytest.raises(ValueError, match="empty backend"):
        small.train(data)
    empty = create_backend(IndexConf(factory="IVF16,Flat"), D)
    assert not empty.trained and len(empty) == 0
    empty.train(data[:1000])
    assert empty.trained and empty.train_size == 0 and empty.stats()["structure"] == "IVF16,Flat"
    assert create_backend(IndexConf(factory="HNSW32"), D).trained
    assert create_backend(IndexConf(backend="numpy"), D).train_size == 0


# -- faiss structures through the store ------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
def test_store_lifecycle(factory: str, data: np.ndarray, tmp_path: Path) -> None:
    """Through the store: train at checkpoint, remove, update, checkpoint, reopen."""
    conf = IndexConf(factory=factory, nprobe=16, ef_search=64)
    store = IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, conf)
    ids = np.array(store.add([NewImage(f"/img/{i}.jpg") for i in range(N)], data))
    store.checkpoint()
    assert store.manifest.checkpoint.fallback is False and store.stats()["trained"]
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
        stats = reader.stats()
        if factory == "HNSW32":  # tombstones re-derived: 100 removed + 10 replaced
            assert stats["dead"] == 110 and stats["search_params"] == {"ef_search": 64}
        if factory.startswith("IVF"):
            assert stats["search_params"] == {"nprobe": 16}
        assert stats["live"] == len(reader) == N - 100


def test_checkpoint_trains_once_enough(data: np.ndarray, tmp_path: Path) -> None:
    store = IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, IndexConf(factory="IVF16,Flat"))
    store.add([NewImage(f"/a/{i}") for i in range(500)], data[:500])
    store.checkpoint()
    assert store.manifest.checkpoint.fallback is True
    early = IndexStore.open(tmp_path / "ix")
    assert not early.stats()["trained"]
    store.add([NewImage(f"/b/{i}") for i in range(500, N)], data[500:])
    store.checkpoint()
    assert store.manifest.checkpoint.fallback is False
    store.close()
    early.refresh()  # reloads to pick up the trained structure
    assert early.stats()["trained"] and len(early) == N
    early.close()
    with IndexStore.open(tmp_path / "ix") as reader:
        assert reader.stats()["trained"] and reader.stats()["structure"] == "IVF16,Flat"
        _, found = reader.search(data[:50], 1)
        np.testing.assert_array_equal(found[:, 0], np.arange(1, 51))


def test_tombstoned_structure_rebuilt_at_checkpoint(data: np.ndarray, tmp_path: Path) -> None:
    store = IndexStore.create(tmp_path / "ix", DESCRIPTOR, D, IndexConf(factory="HNSW32"))
    ids = store.add([NewImage(f"/a/{i}") for i in range(400)], data[:400])
    store.remove(ids[:200])
    assert store.stats()["dead"] == 200
    store.checkpoint()  # half dead: rebuilt without tombstones
    assert (store.stats()["dead"], store.stats()["live"]) == (0, 200)
    store.close()


# -- factories and presets ---------------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF1024,PQ32", "PCA16,IVF16,SQ8"])
def test_validate_factory_accepts(factory: str) -> None:
    validate_factory(factory, 64)


@pytest.mark.parametrize("name", sorted(INDEX_PRESETS))
def test_presets_are_valid(name: str) -> None:
    conf = get_index_conf(name)
    validate_conf(conf, 1280)
    assert create_backend(conf, 64).stats()["backend"] == conf.backend


def test_unknown_preset_and_bad_conf() -> None:
    with pytest.raises(ConfigError, match="exact"):
        get_index_conf("fastest")
    with pytest.raises(ConfigError, match="nprobe"):
        IndexConf(nprobe=0)
    with pytest.raises(ConfigError, match="ef_search"):
        IndexConf(ef_search=0)
    with pytest.raises(ConfigError, match="non-empty"):
        IndexConf(factory=" ")
    error = RuntimeError("Error in void f() at /x/y.cpp:12: Error: 'a' failed: boom")
    assert faiss_message(error) == "'a' failed: boom"
