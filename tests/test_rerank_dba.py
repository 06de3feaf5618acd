"""Database-side augmentation: the maths against plain loops; the stored DBA staying equal
to a from-scratch computation through adds, updates, removals, whitening changes, saving and
reloading; ``DBAState`` computing it once and storing it; the stage (through the stage
protocol). How searchers share, store and follow it is in ``test_search.py``.

Synthetic clustered unit vectors in 16-d, a ``Flat`` index, a few dozen images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from index_helpers import DESCRIPTOR

import lookalike.rerank.dba as dba_module
from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexStore, NewImage
from lookalike.index.manifest import DBASettings
from lookalike.query import Query, QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank import (
    DBAConf,
    DBAIndex,
    DBARerank,
    DBAState,
    QEConf,
    StageResources,
    alpha_qe,
    build_dba,
    build_stages,
    sync_dba,
)
from lookalike.rerank.dba import DBA_NAME
from lookalike.rerank.functional import dba, knn_lists, max_fuse
from lookalike.whitening import Whitening

D = 16


def clustered(n: int, seed: int = 0, clusters: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def images(names: list[int] | range) -> list[NewImage]:
    return [NewImage(path=f"/img/{i}.jpg") for i in names]


def ref_lists(x: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row, then its k-1 most similar other rows (ties: lower row first)."""
    ids, sims = [], []
    for i in range(len(x)):
        others = sorted(
            ((float(x[i] @ x[j]), j) for j in range(len(x)) if j != i), key=lambda t: (-t[0], t[1])
        )[: k - 1]
        ids.append([i] + [j for _, j in others])
        sims.append([1.0] + [s for s, _ in others])
    return ids, sims


def ref_dba(x: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """DBA written out: sum of the neighbours weighted by max(sim, 0)^alpha, normalised."""
    lists, sims = ref_lists(x, k)
    out = np.zeros_like(x, dtype=np.float64)
    for i, (row, srow) in enumerate(zip(lists, sims, strict=True)):
        for j, s in zip(row, srow, strict=True):
            out[i] += (1.0 if alpha == 0 else max(s, 0.0) ** alpha) * x[j]
        out[i] /= np.linalg.norm(out[i])
    return out.astype(np.float32)


def build(store: IndexStore, k: int, alpha: float) -> DBAIndex:
    return build_dba(store.vector_source(), k, alpha)


def load(store: IndexStore) -> DBAIndex | None:
    return DBAIndex.load(store.path / DBA_NAME, store.vector_source())


def assert_matches_scratch(index: DBAIndex, store: IndexStore) -> None:
    """The state equals a from-scratch build and the plain reference."""
    scratch = build(store, index.k, index.alpha)
    version = store.vector_source().version()
    assert (index.seq, index.epoch) == version == (scratch.seq, scratch.epoch)
    np.testing.assert_array_equal(index.ids, scratch.ids)
    np.testing.assert_array_equal(index.neighbours, scratch.neighbours)
    np.testing.assert_allclose(index.sims, scratch.sims, atol=1e-6)
    np.testing.assert_allclose(index.vectors, scratch.vectors, atol=1e-6)
    live = store.vector_source().live()
    np.testing.assert_array_equal(index.ids, live.ids)
    if len(live.ids):
        np.testing.assert_allclose(
            index.vectors, ref_dba(live.vectors, index.k, index.alpha), atol=1e-5
        )


def context(q: np.ndarray) -> QueryContext:
    return QueryContext(Query(vector=q), q)


def first_stage(store: IndexStore, q: np.ndarray, k: int) -> Ranking:
    scores, ids = store.vector_source().search(q[None], k)
    return Ranking(scores[0], ids[0])


@pytest.fixture
def store(tmp_path: Path):
    """40 clustered vectors in a Flat index, open for writing."""
    s = IndexStore.create(tmp_path / "index", DESCRIPTOR, D)
    s.add(images(range(40)), clustered(40))
    yield s
    s.close()


@pytest.fixture
def incremental(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never fall back to a full rebuild: exercise the incremental update rule."""
    monkeypatch.setattr(dba_module, "FULL_REBUILD_FRACTION", 10.0)


# -- functional ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 3.0])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_dba_matches_the_definition(k: int, alpha: float) -> None:
    x = clustered(25, seed=1)
    lists, sims = ref_lists(x, k)
    out = dba(x, np.array(lists), np.array(sims), alpha)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, ref_dba(x, k, alpha), atol=1e-6)
    if k == 1:
        np.testing.assert_allclose(out, x, atol=1e-6)


def test_dba_edge_cases() -> None:
    x = clustered(5, seed=2)
    ids = np.array([[0, 3, -1], [1, -1, -1], [2, 4, 0]])
    sims = np.array([[1.0, 0.5, -np.inf], [1.0, -np.inf, -np.inf], [1.0, 0.2, -0.3]])
    out = dba(x, ids, sims, 3.0)
    want0 = x[0] + 0.5**3 * x[3]
    np.testing.assert_allclose(out[0], want0 / np.linalg.norm(want0), atol=1e-6)  # padding
    np.testing.assert_allclose(out[1], x[1], atol=1e-6)  # only itself
    want2 = x[2] + 0.2**3 * x[4]  # a negative similarity weighs 0 for alpha > 0
    np.testing.assert_allclose(out[2], want2 / np.linalg.norm(want2), atol=1e-6)
    # a subset of rows (M < N), a single vector, nothing at all
    assert dba(x, ids[:1], sims[:1], 0.0).shape == (1, D)
    np.testing.assert_allclose(dba(x[:1], np.array([[0]]), np.array([[1.0]]), 3.0), x[:1])
    assert dba(x[:0], np.zeros((0, 3), np.int64), np.zeros((0, 3)), 3.0).shape == (0, D)
    # weights that all vanish: the first neighbour (the image itself) is kept
    np.testing.assert_allclose(dba(x, np.array([[1, 2]]), np.array([[-1.0, -1.0]]), 3.0), x[1:2])
    with pytest.raises(ValueError, match="out of range"):
        dba(x, np.array([[7]]), np.array([[1.0]]), 0.0)
    with pytest.raises(ValueError, match=r"\(M, k\)"):
        dba(x, np.array([0, 1]), np.array([1.0, 1.0]), 0.0)


@pytest.mark.parametrize("k", [1, 3, 30])
def test_knn_lists_match_brute_force(k: int) -> None:
    x = clustered(20, seed=3)
    pos, sims = knn_lists(x, np.arange(20), k, chunk=7)
    want_ids, want_sims = ref_lists(x, min(k, 20))
    np.testing.assert_array_equal(pos[:, : min(k, 20)], np.array(want_ids))
    np.testing.assert_allclose(sims[:, : min(k, 20)], np.array(want_sims), atol=1e-6)
    assert (pos[:, 20:] == -1).all() and np.isneginf(sims[:, 20:]).all()  # k > N: padding
    sub_pos, _ = knn_lists(x, np.array([5, 2]), k)
    np.testing.assert_array_equal(sub_pos, pos[[5, 2]])
    one_pos, one_sims = knn_lists(x[:1], np.array([0]), k)  # a single vector: itself only
    assert one_pos[0, 0] == 0 and (one_pos[0, 1:] == -1).all() and one_sims[0, 0] == 1.0
    assert knn_lists(x[:0], np.zeros(0, np.int64), k)[0].shape == (0, k)


# -- building, stale detection, search ------------------------------------------------------


@pytest.mark.parametrize(("k", "alpha"), [(3, 3.0), (5, 0.0)])
def test_build_matches_the_reference(store: IndexStore, k: int, alpha: float) -> None:
    index = build(store, k, alpha)
    assert len(index) == 40 and index.vectors.shape == (40, D)
    assert (index.neighbours[:, 0] == index.ids).all()
    assert_matches_scratch(index, store)


def test_search_is_exact_over_augmented_vectors(store: IndexStore) -> None:
    index = build(store, 3, 3.0)
    q = clustered(2, seed=9)
    scores, ids = index.search(q, 6)
    sims = q @ index.vectors.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(ids, index.ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order, 1), atol=1e-6)
    one_s, one_i = index.search(q[0], 0)  # one query, k <= 0: every image
    assert one_s.shape == one_i.shape == (40,)
    _, padded = index.search(q[0], 45)
    assert (padded[40:] == -1).all() and (padded[:40] >= 0).all()
    with pytest.raises(ValueError, match="queries"):
        index.search(q[:, :8], 3)
    known, vectors = index.lookup(np.array([index.ids[3], 999, index.ids[0]]))
    assert known.tolist() == [True, False, True]
    np.testing.assert_array_equal(vectors, index.vectors[[3, 0]])
    with pytest.raises(ValueError, match="no DBA vector"):
        index.augmented([999])


def test_stale_state_is_never_searched(store: IndexStore) -> None:
    index = build(store, 3, 3.0)
    assert index.is_current()
    store.add(images([100]), clustered(1, seed=5))
    assert not index.is_current()
    with pytest.raises(IndexStateError, match="update"):
        index.search(clustered(1, seed=6), 3)
    with pytest.raises(IndexStateError, match="update"):
        index.save(store.path / DBA_NAME)
    assert index.search(clustered(1, seed=6), 3, check=False)[1].shape == (1, 3)  # asked for
    assert index.update() > 0 and index.is_current()
    assert index.search(clustered(1, seed=6), 3)[1].shape == (1, 3)


# -- consistency through changes ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["incremental", "full"])
def test_consistent_after_add_update_remove(
    store: IndexStore, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        dba_module, "FULL_REBUILD_FRACTION", 10.0 if mode == "incremental" else -1.0
    )
    index = build(store, 4, 3.0)
    rng = np.random.default_rng(7)
    ids = {r.path: r.id for r in store.records()}
    steps = [
        ("add", lambda: store.add(images([40, 41, 42]), clustered(3, seed=11))),
        ("update", lambda: store.add(images([3, 17]), clustered(2, seed=12))),
        ("remove", lambda: store.remove([ids["/img/5.jpg"], ids["/img/22.jpg"]])),
        ("mixed", lambda: store.add(images([8, 43]), clustered(2, seed=13))),
        ("remove-new", lambda: store.remove([ids["/img/0.jpg"]])),
    ]
    for _, change in steps:
        change()
        recomputed = index.update()
        assert 0 < recomputed <= len(index)
        if mode == "incremental":
            assert recomputed < len(index)  # only the affected lists were recomputed
        else:
            assert recomputed == len(index)
        assert_matches_scratch(index, store)
    # the update of a near-duplicate of an image must reach that image's reverse neighbours
    live = store.vector_source().live()
    dup = live.vectors[10] + 0.01 * rng.standard_normal(D).astype(np.float32)
    store.add(images([99]), (dup / np.linalg.norm(dup))[None].astype(np.float32))
    index.update()
    assert_matches_scratch(index, store)
    assert index.update() == 0  # already current


def test_add_then_remove_between_updates(store: IndexStore, incremental: None) -> None:
    index = build(store, 3, 0.0)
    (new_id,) = store.add(images([77]), clustered(1, seed=20))
    store.remove([new_id])  # the version moved, the vector set is back as it was
    assert not index.is_current()
    assert index.update() == 0 and index.is_current()
    assert_matches_scratch(index, store)


def test_many_changes_rebuild_everything(store: IndexStore) -> None:
    index = build(store, 3, 3.0)
    store.add(images(range(100, 130)), clustered(30, seed=21))  # 30 of 70: > a quarter
    assert index.update() == 70
    assert_matches_scratch(index, store)


def test_whitening_change_rebuilds(store: IndexStore, incremental: None) -> None:
    index = build(store, 3, 3.0)
    rng = np.random.default_rng(4)
    store.set_whitening(
        Whitening(
            mean=np.zeros(D, np.float32), projection=rng.standard_normal((D, 8)).astype(np.float32)
        )
    )
    assert not index.is_current()
    assert index.update() == 40 and index.epoch > 0 and index.vectors.shape == (40, 8)
    assert_matches_scratch(index, store)


def test_compaction_keeps_the_state_current(store: IndexStore) -> None:
    store.add(images([1, 2]), clustered(2, seed=30))  # updates leave dead vector rows
    index = build(store, 3, 3.0)
    store.compact()  # rewrites the vector file, prunes ops, changes no vector
    assert index.is_current()
    assert_matches_scratch(index, store)


def test_empty_and_one_image_index(tmp_path: Path, incremental: None) -> None:
    with IndexStore.create(tmp_path / "index", DESCRIPTOR, D) as store:
        index = build(store, 3, 3.0)
        assert len(index) == 0
        scores, ids = index.search(clustered(1)[0], 3)
        assert ids.tolist() == [-1, -1, -1] and np.isneginf(scores).all()
        assert index.search(clustered(1)[0], 0)[1].shape == (0,)
        index.save(store.path / DBA_NAME)
        (one,) = store.add(images([0]), clustered(1, seed=1))
        assert index.update() == 1
        np.testing.assert_allclose(index.vectors, store.vector_source().vectors([one]), atol=1e-6)
        assert index.neighbours.tolist() == [[one, -1, -1]]
        assert index.search(clustered(1)[0], 2)[1].tolist() == [one, -1]
        store.add(images([1]), clustered(1, seed=2))
        index.update()
        assert_matches_scratch(index, store)
        store.remove([r.id for r in store.records()])
        index.update()
        assert len(index) == 0 and index.search(clustered(1)[0], 1)[1].tolist() == [-1]


# -- the stored file and the writer's sync ---------------------------------------------------


def test_saved_reloaded_and_synced(store: IndexStore, computations: list[int]) -> None:
    index = DBAState(store, 3, 3.0).current()  # none stored: computed and stored (writer)
    path = store.path / DBA_NAME
    assert path.exists() and not list(store.path.glob("*.tmp"))
    assert store.manifest.dba == DBASettings(3, 3.0) and len(computations) == 1
    loaded = load(store)
    assert loaded is not None and (loaded.k, loaded.alpha) == (3, 3.0)
    assert (loaded.seq, loaded.epoch) == (index.seq, index.epoch) and loaded.is_current()
    for name in ("ids", "neighbours", "sims", "vectors"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    again = DBAState(store, 3, 3.0)
    assert again.current().is_current() and again.computed == 0 and len(computations) == 1
    store.add(images([50, 51]), clustered(2, seed=40))
    synced = sync_dba(store)  # what the indexing pipeline calls after its changes
    assert synced is not None and synced.is_current() and len(computations) == 1
    reloaded = load(store)
    assert reloaded is not None and reloaded.is_current()
    assert_matches_scratch(reloaded, store)
    # other settings: computed, but kept in memory: the index keeps the DBA it records
    other = DBAState(store, 5, 0.0)
    assert (other.current().k, other.computed, other.stored) == (5, 1, False)
    assert load(store).k == 3 and store.manifest.dba == DBASettings(3, 3.0)  # type: ignore[union-attr]


def test_a_writer_stores_what_it_follows(store: IndexStore, computations: list[int]) -> None:
    state = DBAState(store, 3, 3.0)
    state.current()
    store.add(images([60]), clustered(1, seed=41))
    assert state.current().is_current() and 0 < state.recomputed < 41
    assert load(store).is_current() and len(computations) == 1  # type: ignore[union-attr]


def test_no_stored_dba_and_damaged_file(store: IndexStore, caplog) -> None:
    assert load(store) is None and sync_dba(store) is None
    (store.path / DBA_NAME).write_bytes(b"not an npz")
    with pytest.raises(IndexStateError, match="damaged"):
        load(store)
    with caplog.at_level(logging.WARNING, logger="lookalike.rerank.dba_stage"):
        state = DBAState(store, 3, 3.0)
        assert state.current().is_current() and state.computed == 1  # computed again
    assert "damaged" in caplog.text and load(store).is_current()  # type: ignore[union-attr]


def test_sync_recomputes_a_recorded_dba_whose_file_is_gone(store: IndexStore) -> None:
    DBAState(store, 3, 3.0).current()
    (store.path / DBA_NAME).unlink()
    synced = sync_dba(store)
    assert synced is not None and (synced.k, synced.alpha) == (3, 3.0)
    assert_matches_scratch(load(store), store)  # type: ignore[arg-type]


def test_writer_recovery_keeps_the_dba_file(store: IndexStore) -> None:
    DBAState(store, 3, 3.0).current()
    root = store.path
    store.close()
    with IndexStore.open(root, writable=True) as again:
        assert (root / DBA_NAME).exists()
        assert load(again).is_current()  # type: ignore[union-attr]


# -- the re-ranking stage --------------------------------------------------------------------


def test_stage_searches_the_augmented_database_and_follows_changes(store: IndexStore) -> None:
    stage = DBARerank(DBAState(store, 3, 3.0), DBAConf(k=3, alpha=3.0, keep_first_stage=False))
    q = clustered(1, seed=50)[0]
    r0 = first_stage(store, q, 10)
    out = stage(context(q), r0, 5)
    want = build(store, 3, 3.0).search(q, 5)
    np.testing.assert_array_equal(out.ids, want[1])
    np.testing.assert_allclose(out.scores, want[0], atol=1e-6)
    assert out.scores.dtype == np.float32 and out.ids.dtype == np.int64
    (new_id,) = store.add(images([200]), q[None])  # the query itself enters the index
    assert stage(context(q), r0, 5).ids[0] == new_id  # never the stale state
    assert load(store).is_current()  # type: ignore[union-attr]  # writer: saved
    assert stage(context(q), r0, 0).ids.shape == (0,)


@pytest.mark.parametrize("expand_from", ["first-stage", "dba"])
def test_stage_with_query_expansion(store: IndexStore, expand_from: str) -> None:
    qe = QEConf(n=2, alpha=3.0)
    conf = DBAConf(3, 3.0, qe=qe, expand_from=expand_from, keep_first_stage=False)
    stage = DBARerank(DBAState(store, 3, 3.0), conf, "dba+alpha-qe")
    q = clustered(1, seed=51)[0]
    r0 = first_stage(store, q, 10)
    out = stage(context(q), r0, 6)
    index = build(store, 3, 3.0)
    if expand_from == "dba":
        top_s, top_i = index.search(q, 2)
    else:
        top_s, top_i = r0.scores[:2], r0.ids[:2]
    expanded = alpha_qe(q, index.augmented(top_i), top_s, 3.0, 2)
    np.testing.assert_array_equal(out.ids, index.search(expanded, 6)[1])
    if expand_from == "first-stage":
        # no usable first-stage result: the query is searched as it is
        none = stage(context(q), Ranking.empty(3), 6)
        np.testing.assert_array_equal(none.ids, index.search(q, 6)[1])
        # a removed top result is skipped: the next known ones expand the query
        removed = Ranking.of([0.99, *r0.scores[:2]], [999, *r0.ids[:2]])
        np.testing.assert_array_equal(stage(context(q), removed, 6).ids, out.ids)


def test_stage_keeps_first_stage_scores(store: IndexStore) -> None:
    q = clustered(1, seed=52)[0]
    r0 = first_stage(store, q, 40)
    r0.scores[3] = 5.0  # a first-stage score above any cosine: must stay on top
    out = DBARerank(DBAState(store, 3, 1.0), DBAConf(k=3, alpha=1.0))(context(q), r0, 10)
    plain_s, plain_i = build(store, 3, 1.0).search(q, 40)
    want_s, want_i = max_fuse(plain_s, plain_i, r0.scores, r0.ids, 10)
    assert out.ids[0] == r0.ids[3] and out.scores[0] == 5.0
    np.testing.assert_array_equal(out.ids, want_i)
    np.testing.assert_allclose(out.scores, want_s)


def test_conf_validation(store: IndexStore) -> None:
    for bad in ({"k": 0}, {"k": 2.5}, {"alpha": -1.0}, {"expand_from": "nowhere"}):
        with pytest.raises(ConfigError):
            DBAConf(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dba"):
        build_stages(["dbb"], StageResources(store))
    with pytest.raises(ConfigError, match="k=5"):
        DBARerank(DBAState(store, 3, 1.0), DBAConf(k=5))
    with pytest.raises(ConfigError):
        DBAState(store, 0, 1.0)
