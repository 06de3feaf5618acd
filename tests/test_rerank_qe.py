"""Query expansion: the maths against plain loops, the stage on a small index, the store's
index-space API it relies on, and the re-ranking registry.

Synthetic unit vectors in 16-d and a ``Flat`` index, so every search is exact and can be
checked against brute-force numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.index import IndexStore, NewImage
from lookalike.rerank import (
    QE_PRESETS,
    RERANKERS,
    DBARerank,
    QEConf,
    QueryExpansion,
    Reranker,
    alpha_qe,
    average_qe,
    create_reranker,
    descriptor_pipeline,
    run_pipeline,
)
from lookalike.rerank.functional import max_fuse
from lookalike.whitening import Whitening

D = 16


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_alpha_qe(q: np.ndarray, nbs: np.ndarray, sims: np.ndarray, alpha: float, n: int):
    """The definition, one neighbour at a time: padding (non-finite sims) skipped."""
    total = [float(v) for v in q]
    used = 0
    for x, s in zip(nbs, sims, strict=True):
        if used == n:
            break
        if not np.isfinite(s):
            continue
        w = 1.0 if alpha == 0 else max(float(s), 0.0) ** alpha
        total = [t + w * float(v) for t, v in zip(total, x, strict=True)]
        used += 1
    norm = sum(t * t for t in total) ** 0.5
    return np.array([t / norm for t in total], dtype=np.float32)


@pytest.fixture
def store(tmp_path: Path):
    """60 clustered vectors (6 clusters of 10) in a Flat index, open for writing."""
    rng = np.random.default_rng(1)
    centres = unit(6, seed=2)
    x = np.repeat(centres, 10, axis=0) + 0.35 * rng.standard_normal((60, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = IndexStore.create(tmp_path / "index", {"synthetic": True}, D)
    ids = s.add([NewImage(path=f"/img/{i}.jpg") for i in range(60)], x)
    s.x, s.ids = x, np.array(ids)  # type: ignore[attr-defined]
    yield s
    s.close()


# -- functional ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_alpha_qe_matches_the_definition(alpha: float, n: int) -> None:
    q, nbs = unit(1, seed=3)[0], unit(8, seed=4)
    sims = np.sort(nbs @ q)[::-1].copy()  # negative ones included: clipped to 0 unless alpha 0
    out = alpha_qe(q, nbs, sims, alpha=alpha, n=n)
    assert out.dtype == np.float32 and out.shape == (D,)
    np.testing.assert_allclose(out, ref_alpha_qe(q, nbs, sims, alpha, n), atol=1e-6)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-6)


def test_alpha_zero_is_average_qe() -> None:
    q, nbs = unit(1, seed=5)[0], unit(6, seed=6)
    sims = np.linspace(0.9, -0.2, 6)
    np.testing.assert_allclose(average_qe(q, nbs, 3), alpha_qe(q, nbs, sims, 0.0, 3), atol=1e-7)
    mean = (q + nbs[:3].sum(axis=0)) / 4
    np.testing.assert_allclose(average_qe(q, nbs, 3), mean / np.linalg.norm(mean), atol=1e-6)


def test_qe_edge_cases() -> None:
    q, nbs = unit(1, seed=7)[0], unit(4, seed=8)
    sims = np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32)
    np.testing.assert_allclose(alpha_qe(q, nbs, sims, 3.0, n=0), q, atol=1e-7)  # n=0: unchanged
    np.testing.assert_allclose(average_qe(q, nbs[:0], 3), q, atol=1e-7)  # no neighbours
    # fewer neighbours than n: all of them
    np.testing.assert_allclose(
        alpha_qe(q, nbs, sims, 3.0, n=10), ref_alpha_qe(q, nbs, sims, 3.0, 4), atol=1e-6
    )
    # faiss padding (-inf score) is ignored, whatever its vector holds
    padded = np.vstack([nbs[:2], np.zeros((1, D), np.float32), nbs[2:]])
    psims = np.array([0.9, 0.8, -np.inf, 0.7, 0.6], dtype=np.float32)
    np.testing.assert_allclose(alpha_qe(q, padded, psims, 3.0, n=3), alpha_qe(q, nbs, sims, 3.0, 3))
    # all weights zero (negative sims, alpha > 0): the query itself
    np.testing.assert_allclose(alpha_qe(q, nbs, -sims, 3.0, n=4), q, atol=1e-6)
    # a neighbour opposite to the query cancelling it: the query is kept, not NaN
    assert np.isfinite(average_qe(q, -q[None], 1)).all()


def test_max_fuse_keeps_each_ids_best_score() -> None:
    rng = np.random.default_rng(12)
    for _ in range(20):
        a, b = rng.permutation(30)[:10], rng.permutation(30)[:12]
        sa = np.sort(rng.random(10).astype(np.float32))[::-1]
        sb = np.sort(rng.random(12).astype(np.float32))[::-1]
        a[-2:], sa[-2:] = -1, -np.inf  # padding
        k = int(rng.integers(1, 30))
        best: dict[int, float] = {}
        for s, i in [*zip(sa, a, strict=True), *zip(sb, b, strict=True)]:
            if i >= 0:
                best[int(i)] = max(best.get(int(i), -np.inf), float(s))
        want = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:k]
        out_s, out_i = max_fuse(sa, a, sb, b, k)
        assert out_s.shape == out_i.shape == (k,)
        assert out_i[: len(want)].tolist() == [i for i, _ in want]
        np.testing.assert_allclose(out_s[: len(want)], [s for _, s in want])
        assert (out_i[len(want) :] == -1).all() and np.isneginf(out_s[len(want) :]).all()
    empty = max_fuse(np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), 2)
    assert empty[1].tolist() == [-1, -1]


def test_qe_rejects_bad_input() -> None:
    q, nbs = unit(1, seed=9)[0], unit(3, seed=10)
    with pytest.raises(ValueError, match="one"):
        alpha_qe(q[None], nbs, np.ones(3), 3.0, 2)
    with pytest.raises(ValueError, match="similarities"):
        alpha_qe(q, nbs, np.ones(2), 3.0, 2)
    with pytest.raises(ValueError, match="alpha"):
        alpha_qe(q, nbs, np.ones(3), -1.0, 2)
    with pytest.raises(ValueError, match="n must"):
        alpha_qe(q, nbs, np.ones(3), 3.0, -1)
    with pytest.raises(ConfigError):
        QEConf(n=-1)
    with pytest.raises(ConfigError):
        QEConf(alpha=-0.5)


# -- the store's index-space API ------------------------------------------------------------


def test_index_space_api_without_whitening(store: IndexStore) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    assert store.index_dim == D
    np.testing.assert_array_equal(store.index_space(x[:3]), x[:3])
    np.testing.assert_array_equal(store.index_vectors(ids[[5, 2]]), x[[5, 2]])
    a = store.search(x[:4], 7)
    b = store.search_index_space(store.index_space(x[:4]), 7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert store.search_index_space(x[:1], 0)[1].shape == (1, 60)  # k <= 0: everything
    with pytest.raises(ValueError, match="float32"):
        store.index_space(x[:1].astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        store.search_index_space(x[:1, :8], 3)
    with pytest.raises(ValueError, match="no vector"):
        store.index_vectors([999])


def test_index_space_api_with_whitening(store: IndexStore) -> None:
    rng = np.random.default_rng(3)
    white = Whitening(
        mean=0.01 * rng.standard_normal(D).astype(np.float32),
        projection=rng.standard_normal((D, 8)).astype(np.float32),
    )
    store.set_whitening(white)
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    assert store.index_dim == 8
    np.testing.assert_allclose(store.index_space(x[:3]), white.apply(x[:3]), atol=1e-6)
    np.testing.assert_allclose(store.index_vectors(ids[:3]), white.apply(x[:3]), atol=1e-6)
    a = store.search(x[:5], 6)
    b = store.search_index_space(store.index_space(x[:5]), 6)
    np.testing.assert_array_equal(a[1], b[1])


def test_vector_version_and_live_vectors(store: IndexStore) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    seq, epoch = store.vector_version()
    live = store.live_vectors()
    assert (live.seq, live.epoch) == (seq, epoch) == (60, 0)
    np.testing.assert_array_equal(live.ids, np.sort(ids))
    np.testing.assert_array_equal(live.vectors, x[np.argsort(ids)])
    assert live.seqs.max() == seq
    store.add([NewImage(path="/img/3.jpg")], unit(1, seed=11))  # an update: remove + add
    assert store.vector_version() == (62, 0)
    live = store.live_vectors()
    assert live.seqs[live.ids == ids[3]][0] == 62 and (live.seqs > 60).sum() == 1
    store.set_metadata(int(ids[0]), {"a": 1})  # not a vector change
    assert store.vector_version() == (62, 0)
    store.set_whitening(None)
    assert store.vector_version() == (62, 1)


# -- the QE stage ----------------------------------------------------------------------------


def test_query_expansion_stage_is_expand_then_search(store: IndexStore) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    stage = QueryExpansion(QEConf(n=3, alpha=3.0, keep_first_stage=False))
    q = store.index_space(x[7:8])[0]
    s0, i0 = store.search_index_space(q[None], 20)
    out_s, out_i = stage(store, q, s0[0], i0[0], 10)
    assert out_s.shape == out_i.shape == (10,) and out_i.dtype == np.int64
    # brute force: expand with the top 3 stored vectors, rank everything by inner product
    pos = {int(i): p for p, i in enumerate(ids)}
    top = [pos[int(i)] for i in i0[0][:3]]
    expanded = ref_alpha_qe(q, x[top], s0[0][:3], 3.0, 3)
    sims = x @ expanded
    order = np.argsort(-sims, kind="stable")[:10]
    np.testing.assert_array_equal(out_i, ids[order])
    np.testing.assert_allclose(out_s, sims[order], atol=1e-5)
    # keep_first_stage: each id keeps the better of its two scores
    kept_s, kept_i = QueryExpansion(QEConf(n=3, alpha=3.0))(store, q, s0[0], i0[0], 10)
    best = {int(i): float(s) for s, i in zip(sims, ids, strict=True)}
    for s, i in zip(s0[0], i0[0], strict=True):
        best[int(i)] = max(best[int(i)], float(s))
    want = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:10]
    assert kept_i.tolist() == [i for i, _ in want]
    np.testing.assert_allclose(kept_s, [s for _, s in want], atol=1e-5)


def test_query_expansion_recovers_cluster_members(store: IndexStore) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    q = store.index_space(x[10:11])[0]
    s0, i0 = store.search_index_space(q[None], 10)
    stage = QueryExpansion.from_preset("alpha-qe")
    _, out_i = stage(store, q, s0[0], i0[0], 10)
    in_cluster = set(ids[10:20].tolist())
    assert len(in_cluster & set(out_i.tolist())) >= len(in_cluster & set(i0[0].tolist()))


def test_query_expansion_padding_and_empty(tmp_path: Path, store: IndexStore) -> None:
    x = store.x  # type: ignore[attr-defined]
    stage = QueryExpansion(QEConf(n=3, alpha=0.0))
    q = x[0]
    none_s = np.full(5, -np.inf, np.float32)
    none_i = np.full(5, -1, np.int64)
    out_s, out_i = stage(store, q, none_s, none_i, 4)  # nothing to expand with: unchanged
    assert out_i.tolist() == [-1] * 4 and np.isneginf(out_s).all()
    with IndexStore.create(tmp_path / "empty", {"synthetic": True}, D) as empty:
        out_s, out_i = stage(empty, q, none_s, none_i, 3)
        assert out_i.tolist() == [-1, -1, -1]
        assert stage(empty, q, none_s, none_i, 0)[1].shape == (0,)


def test_query_expansion_keeps_first_stage_when_a_result_vanished(store: IndexStore) -> None:
    q = store.x[0]  # type: ignore[attr-defined]
    s0, i0 = store.search_index_space(q[None], 5)
    store.remove([int(i0[0][1])])  # a reader's stale ranking names a removed image
    _, out_i = QueryExpansion(QEConf(n=3))(store, q, s0[0], i0[0], 5)
    np.testing.assert_array_equal(out_i, i0[0])


def test_presets_and_unknown_names() -> None:
    assert QE_PRESETS["aqe"].alpha == 0.0 and QE_PRESETS["alpha-qe"].alpha > 0
    assert QueryExpansion.from_preset("aqe").name == "aqe"
    with pytest.raises(ConfigError, match="alpha-qe"):
        QueryExpansion.from_preset("bqe")
    with pytest.raises(ConfigError, match="choose from"):
        create_reranker("diffusion")


# -- the registry ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RERANKERS))
def test_every_registered_stage_keeps_the_contract(store: IndexStore, name: str) -> None:
    x = store.x  # type: ignore[attr-defined]
    stage = create_reranker(name)
    assert isinstance(stage, Reranker) and stage.name == name
    q = store.index_space(x[21:22])[0]
    s0, i0 = store.search_index_space(q[None], 15)
    out_s, out_i = stage(store, q, s0[0], i0[0], 8)
    assert out_s.shape == out_i.shape == (8,)
    assert out_s.dtype == np.float32 and out_i.dtype == np.int64
    assert np.all(np.diff(out_s) <= 1e-6)  # best first
    assert len(set(out_i.tolist())) == 8 and set(out_i.tolist()) <= set(store.ids.tolist())  # type: ignore[attr-defined]
    assert out_i[0] == store.ids[21]  # type: ignore[attr-defined]
    big_s, big_i = stage(store, q, s0[0], i0[0], 100)  # more than the index holds: padded
    assert (big_i[60:] == -1).all() and np.isneginf(big_s[60:]).all() and (big_i[:60] >= 0).all()


def test_descriptor_pipeline_folds_qe_into_dba(store: IndexStore) -> None:
    stages = descriptor_pipeline(["alpha-qe", "dba"])
    assert [s.name for s in stages] == ["dba+alpha-qe"]
    assert isinstance(stages[0], DBARerank) and stages[0].conf.qe == QE_PRESETS["alpha-qe"]
    assert [s.name for s in descriptor_pipeline(["dba", "aqe"])] == ["dba+aqe"]
    assert [s.name for s in descriptor_pipeline(["aqe"])] == ["aqe"]
    assert descriptor_pipeline([]) == []
    with pytest.raises(ConfigError, match="one query expansion"):
        descriptor_pipeline(["aqe", "dba", "alpha-qe"])
    with pytest.raises(ConfigError, match="verify"):
        descriptor_pipeline(["dba", "verify"])
    x = store.x  # type: ignore[attr-defined]
    q = x[33]
    s0, i0 = store.search_index_space(q[None], 10)
    a = run_pipeline(stages, store, q, s0[0], i0[0], 5)
    b = create_reranker("dba+alpha-qe")(store, q, s0[0], i0[0], 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(run_pipeline([], store, q, s0[0], i0[0], 5)[1], i0[0][:5])
