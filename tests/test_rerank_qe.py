"""Query expansion: the maths against plain loops, the stage (through the one stage
protocol) on a small index, the index-space view it reads (``VectorSource``), and the stage
registry (names, folding, every registered stage keeping the contract).

Synthetic unit vectors in 16-d and a ``Flat`` index, so every search is exact and can be
checked against brute-force numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from index_helpers import DESCRIPTOR

from lookalike.errors import ConfigError
from lookalike.index import IndexStore, NewImage
from lookalike.index.source import VectorSource
from lookalike.query import Query, QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank import (
    ASMK,
    DBA_PRESETS,
    QE_PRESETS,
    STAGES,
    VERIFY,
    DBARerank,
    QEConf,
    QueryExpansion,
    Stage,
    StageResources,
    alpha_qe,
    average_qe,
    build_stages,
    resolve_names,
    stage_depths,
)
from lookalike.rerank.functional import max_fuse
from lookalike.rerank.qe import get_qe_conf
from lookalike.search import Searcher
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


def context(q: np.ndarray) -> QueryContext:
    """What a stage sees of a vector query ``q`` (already in the index space)."""
    return QueryContext(Query(vector=q), q)


def first_stage(source: VectorSource, q: np.ndarray, k: int) -> Ranking:
    scores, ids = source.search(q[None], k)
    return Ranking(scores[0], ids[0])


@pytest.fixture
def store(tmp_path: Path):
    """60 clustered vectors (6 clusters of 10) in a Flat index, open for writing."""
    rng = np.random.default_rng(1)
    centres = unit(6, seed=2)
    x = np.repeat(centres, 10, axis=0) + 0.35 * rng.standard_normal((60, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = IndexStore.create(tmp_path / "index", DESCRIPTOR, D)
    ids = s.add([NewImage(path=f"/img/{i}.jpg") for i in range(60)], x)
    s.x, s.ids = x, np.array(ids)  # type: ignore[attr-defined]
    yield s
    s.close()


@pytest.fixture
def source(store: IndexStore) -> VectorSource:
    return store.vector_source()


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


# -- the index-space view (VectorSource) ----------------------------------------------------


def test_index_space_api_without_whitening(store: IndexStore, source: VectorSource) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    assert isinstance(source, VectorSource) and source.dim == D and len(source) == 60
    np.testing.assert_array_equal(source.to_index_space(x[:3]), x[:3])
    np.testing.assert_array_equal(source.vectors(ids[[5, 2]]), x[[5, 2]])
    a = store.search(x[:4], 7)
    b = source.search(source.to_index_space(x[:4]), 7)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert source.search(x[:1], 0)[1].shape == (1, 60)  # k <= 0: everything
    with pytest.raises(ValueError, match="float32"):
        source.to_index_space(x[:1].astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        source.search(x[:1, :8], 3)
    with pytest.raises(ValueError, match="no vector"):
        source.vectors([999])


def test_index_space_api_with_whitening(store: IndexStore, source: VectorSource) -> None:
    rng = np.random.default_rng(3)
    white = Whitening(
        mean=0.01 * rng.standard_normal(D).astype(np.float32),
        projection=rng.standard_normal((D, 8)).astype(np.float32),
    )
    store.set_whitening(white)
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    assert source.dim == 8
    np.testing.assert_allclose(source.to_index_space(x[:3]), white.apply(x[:3]), atol=1e-6)
    np.testing.assert_allclose(source.vectors(ids[:3]), white.apply(x[:3]), atol=1e-6)
    a = store.search(x[:5], 6)
    b = source.search(source.to_index_space(x[:5]), 6)
    np.testing.assert_array_equal(a[1], b[1])


def test_vector_version_and_live_vectors(store: IndexStore, source: VectorSource) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    seq, epoch = source.version()
    live = source.live()
    assert (live.seq, live.epoch) == (seq, epoch) == (60, 0)
    np.testing.assert_array_equal(live.ids, np.sort(ids))
    np.testing.assert_array_equal(live.vectors, x[np.argsort(ids)])
    assert live.seqs.max() == seq
    store.add([NewImage(path="/img/3.jpg")], unit(1, seed=11))  # an update: remove + add
    assert source.version() == (62, 0)
    live = source.live()
    assert live.seqs[live.ids == ids[3]][0] == 62 and (live.seqs > 60).sum() == 1
    store.set_metadata(int(ids[0]), {"a": 1})  # not a vector change
    assert source.version() == (62, 0)
    store.set_whitening(None)
    assert source.version()[0] == 62 and source.version()[1] > epoch


# -- the QE stage ----------------------------------------------------------------------------


def test_query_expansion_stage_is_expand_then_search(store: IndexStore, source) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    stage = QueryExpansion(source, QEConf(n=3, alpha=3.0, keep_first_stage=False))
    assert isinstance(stage, Stage) and stage.depth == 0
    q = source.to_index_space(x[7:8])[0]
    r0 = first_stage(source, q, 20)
    out = stage(context(q), r0, 10)
    assert out.scores.shape == out.ids.shape == (10,) and out.ids.dtype == np.int64
    assert out.scores.dtype == np.float32 and out.inliers is None
    # brute force: expand with the top 3 stored vectors, rank everything by inner product
    pos = {int(i): p for p, i in enumerate(ids)}
    top = [pos[int(i)] for i in r0.ids[:3]]
    expanded = ref_alpha_qe(q, x[top], r0.scores[:3], 3.0, 3)
    sims = x @ expanded
    order = np.argsort(-sims, kind="stable")[:10]
    np.testing.assert_array_equal(out.ids, ids[order])
    np.testing.assert_allclose(out.scores, sims[order], atol=1e-5)
    # keep_first_stage: each id keeps the better of its two scores
    kept = QueryExpansion(source, QEConf(n=3, alpha=3.0))(context(q), r0, 10)
    best = {int(i): float(s) for s, i in zip(sims, ids, strict=True)}
    for s, i in zip(r0.scores, r0.ids, strict=True):
        best[int(i)] = max(best[int(i)], float(s))
    want = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:10]
    assert kept.ids.tolist() == [i for i, _ in want]
    np.testing.assert_allclose(kept.scores, [s for _, s in want], atol=1e-5)


def test_query_expansion_expands_from_the_ranking_it_is_given(store: IndexStore, source) -> None:
    """The neighbours come from the given ranking (e.g. the fused rotations), not a new
    search: a hand-made ranking naming other images expands with those."""
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    stage = QueryExpansion(source, QEConf(n=2, alpha=0.0, keep_first_stage=False))
    q = x[0]
    made = Ranking.of([0.9, 0.8, 0.1], [ids[45], ids[31], ids[2]])
    out = stage(context(q), made, 5)
    expanded = ref_alpha_qe(q, x[[45, 31]], np.array([0.9, 0.8]), 0.0, 2)
    order = np.argsort(-(x @ expanded), kind="stable")[:5]
    np.testing.assert_array_equal(out.ids, ids[order])


def test_query_expansion_recovers_cluster_members(store: IndexStore, source) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    q = source.to_index_space(x[10:11])[0]
    r0 = first_stage(source, q, 10)
    stage = QueryExpansion(source, QE_PRESETS["alpha-qe"], "alpha-qe")
    out = stage(context(q), r0, 10)
    in_cluster = set(ids[10:20].tolist())
    assert len(in_cluster & set(out.ids.tolist())) >= len(in_cluster & set(r0.ids.tolist()))


def test_query_expansion_padding_and_empty(tmp_path: Path, store: IndexStore, source) -> None:
    x = store.x  # type: ignore[attr-defined]
    stage = QueryExpansion(source, QEConf(n=3, alpha=0.0))
    q = x[0]
    none = Ranking.empty(5)
    out = stage(context(q), none, 4)  # nothing to expand with: unchanged
    assert out.ids.tolist() == [-1] * 4 and np.isneginf(out.scores).all()
    with IndexStore.create(tmp_path / "empty", DESCRIPTOR, D) as empty:
        on_empty = QueryExpansion(empty.vector_source(), QEConf(n=3, alpha=0.0))
        assert on_empty(context(q), none, 3).ids.tolist() == [-1, -1, -1]
        assert on_empty(context(q), none, 0).ids.shape == (0,)


def test_query_expansion_keeps_first_stage_when_a_result_vanished(store: IndexStore, source):
    q = store.x[0]  # type: ignore[attr-defined]
    r0 = first_stage(source, q, 5)
    store.remove([int(r0.ids[1])])  # a reader's stale ranking names a removed image
    out = QueryExpansion(source, QEConf(n=3))(context(q), r0, 5)
    np.testing.assert_array_equal(out.ids, r0.ids)


def test_presets_and_unknown_names(store: IndexStore) -> None:
    assert QE_PRESETS["aqe"].alpha == 0.0 and QE_PRESETS["alpha-qe"].alpha > 0
    assert get_qe_conf("aqe") is QE_PRESETS["aqe"]
    with pytest.raises(ConfigError, match="alpha-qe"):
        get_qe_conf("bqe")
    with pytest.raises(ConfigError, match="choose from"):
        build_stages(["diffusion"], StageResources(store))


# -- the registry ----------------------------------------------------------------------------


# the local-feature stages pass a vector query's ranking through (tests/test_verify.py,
# tests/test_asmk.py test them on images)
@pytest.mark.parametrize("name", [n for n in STAGES if n not in (VERIFY, ASMK)])
def test_every_registered_stage_keeps_the_contract(store: IndexStore, source, name: str) -> None:
    x, ids = store.x, store.ids  # type: ignore[attr-defined]
    (stage,) = build_stages([name], StageResources(store))
    assert isinstance(stage, Stage) and stage.name == name
    q = source.to_index_space(x[21:22])[0]
    r0 = first_stage(source, q, 15)
    out = stage(context(q), r0, 8)
    assert out.scores.shape == out.ids.shape == (8,)
    assert out.scores.dtype == np.float32 and out.ids.dtype == np.int64
    assert np.all(np.diff(out.scores) <= 1e-6)  # best first
    assert len(set(out.ids.tolist())) == 8 and set(out.ids.tolist()) <= set(ids.tolist())
    assert out.ids[0] == ids[21]
    big = stage(context(q), r0, 100)  # more than the index holds: padded
    assert (big.ids[60:] == -1).all() and np.isneginf(big.scores[60:]).all()
    assert (big.ids[:60] >= 0).all()
    assert stage(context(q), r0, 0).ids.shape == (0,)


def test_resolve_names_folds_qe_into_dba_and_puts_verify_last() -> None:
    assert resolve_names(["alpha-qe", "dba"]) == ["dba+alpha-qe"]
    assert resolve_names(["dba", "aqe"]) == ["dba+aqe"]
    assert resolve_names(["aqe"]) == ["aqe"] and resolve_names([]) == []
    assert resolve_names(["verify", "dba"]) == ["dba", VERIFY]
    assert resolve_names(["aqe", "verify", "dba"]) == ["dba+aqe", VERIFY]
    assert resolve_names(["aqe", "alpha-qe"]) == ["aqe", "alpha-qe"]  # no dba: both run
    with pytest.raises(ConfigError, match="one query expansion"):
        resolve_names(["aqe", "dba", "alpha-qe"])
    with pytest.raises(ConfigError, match="already expands"):
        resolve_names(["dba+aqe", "alpha-qe"])
    with pytest.raises(ConfigError, match="twice"):
        resolve_names(["verify", "dba", "verify"])
    with pytest.raises(ConfigError, match=r"unknown re-ranking stage 'dbb'.*dba"):
        resolve_names(["dbb"])


def test_folded_stage_is_the_dba_qe_preset_and_ranks_like_it(store: IndexStore) -> None:
    resources = StageResources(store)
    (folded,) = build_stages(["alpha-qe", "dba"], resources)
    assert isinstance(folded, DBARerank) and folded.name == "dba+alpha-qe"
    assert folded.conf == DBA_PRESETS["dba+alpha-qe"] and folded.conf.qe == QE_PRESETS["alpha-qe"]
    (named,) = build_stages(["dba+alpha-qe"], resources)
    assert named.state is folded.state  # one DBA per (k, alpha), shared
    x = store.x  # type: ignore[attr-defined]
    with Searcher(store, stages=[folded]) as a, Searcher(store, stages=[named]) as b:
        np.testing.assert_array_equal(a.search(x[30:34], 5).ids, b.search(x[30:34], 5).ids)
        plain = Searcher(store).search(x[33:34], 5)
        assert not np.array_equal(a.search(x[33:34], 5).scores, plain.scores)


def test_stage_depths() -> None:
    class Reads:
        name = "reads"

        def __init__(self, depth: int) -> None:
            self.depth = depth

    assert stage_depths([], 7) == (7, [])
    assert stage_depths([Reads(0)], 7) == (100, [7])  # a stage sees RERANK_DEPTH results
    # a stage returns at least what any later one reads; the first stage at least every depth
    assert stage_depths([Reads(0), Reads(30), Reads(0)], 5) == (100, [30, 5, 5])
    assert stage_depths([Reads(250), Reads(0)], 5) == (250, [5, 5])
    assert stage_depths([Reads(0)], 300) == (300, [300])
