"""Searcher: one entry point for every kind of query, query defaults recorded in the index,
rotation fusion, joins to records, the stages composed through the one protocol (QE, DBA and
a verify stage with made-up inlier counts), siblings sharing their state, following the
index, and the DBA computed once per index.

Two indexes: a few real images described by the small test model (image queries), and
synthetic unit vectors (everything else, exact and fast).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
from conftest import read_only_view, write_images
from index_helpers import DESCRIPTOR, D, images, run_python, unit

import lookalike.search as search_module
from lookalike.errors import ConfigError, ImageError
from lookalike.index import IndexStore, NewImage
from lookalike.index.manifest import DBASettings
from lookalike.indexing import index_folder
from lookalike.local.conf import VerifyConf
from lookalike.query import Query, QueryContext
from lookalike.ranking import INLIERS, Ranking, fuse_max
from lookalike.rerank import (
    DBAConf,
    DBARerank,
    DBAState,
    QEConf,
    QueryExpansion,
    StageResources,
    build_dba,
    stage_depths,
)
from lookalike.rerank.dba import DBA_NAME, DBAIndex
from lookalike.rerank.verify import GeometricVerifier
from lookalike.search import Hit, Searcher, search

pytest_plugins = ("_fixtures",)

ROTATIONS, PENALTY = (0, 270), 0.07  # the image index's recorded query defaults


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, make_extractor):
    """Six photos indexed with the small test model; queries default to 0 and 270 degrees."""
    root = tmp_path_factory.mktemp("search")
    paths = write_images(root / "images", 6, side=96)
    extractor = make_extractor()
    conf = extractor.conf.replace(query_rotations=ROTATIONS, rotation_penalty=PENALTY)
    index_folder(root / "images", root / "index", conf, extractor=extractor)
    return root / "index", paths, extractor


@pytest.fixture
def searcher(image_index):
    index, _, extractor = image_index
    with Searcher.open(index, extractor=extractor) as s:
        yield s


@pytest.fixture
def vectors(tmp_path):
    """60 random unit vectors in an index on disk (ids 1..60, row i = id i + 1), closed."""
    x = unit(60, seed=3)
    with IndexStore.create(tmp_path / "vectors", DESCRIPTOR, D) as store:
        store.add(images(60), x)
    return tmp_path / "vectors", x


# -- image queries ----------------------------------------------------------------------------


def test_index_records_its_query_defaults(searcher):
    assert searcher.conf.query_rotations == ROTATIONS
    assert searcher.conf.rotation_penalty == pytest.approx(PENALTY)
    assert searcher.store.manifest.query.rotations == ROTATIONS


def test_image_queries_find_themselves_and_join_records(searcher, image_index):
    _, paths, _ = image_index
    ranking = searcher.search(paths[:2], k=3)
    assert ranking.scores.shape == ranking.ids.shape == (2, 3)
    assert ranking.scores.dtype == np.float32 and ranking.ids.dtype == np.int64
    assert ranking.inliers is None
    hits = searcher.results(ranking)
    assert [h[0].path for h in hits] == [str(p.resolve()) for p in paths[:2]]
    assert hits[0][0].score > 0.99 and hits[0][0].rank == 1 and hits[0][0].inliers is None
    assert np.all(np.diff(ranking.scores, axis=1) <= 0)
    assert set(hits[0][0].to_dict()) == {"rank", "id", "path", "score"}
    # k = 0: the whole index, every id once
    every = searcher.search(paths[:1], k=0).ids[0]
    assert sorted(every.tolist()) == sorted(r.id for r in searcher.store.records())


def test_rotated_query_is_found_by_the_recorded_rotations(searcher, image_index, tmp_path):
    from PIL import Image

    _, paths, _ = image_index
    rotated = tmp_path / "rot.png"
    Image.open(paths[3]).rotate(90, expand=True).save(rotated)
    target = searcher.store.find_path(str(paths[3].resolve())).id
    found = searcher.search([rotated], k=1)  # the index's defaults: 0 and 270 degrees
    assert found.ids[0, 0] == target
    # the match came from a rotated view: its score carries the rotation penalty
    assert found.scores[0, 0] == pytest.approx(1.0 - PENALTY, abs=0.01)
    upright = searcher.search([rotated], k=1, rotations=(0,))  # the call's rotations win
    assert upright.scores[0, 0] < found.scores[0, 0] - 0.02
    own = searcher.search([Query(image=rotated, rotations=(0,))], k=1, rotations=(0, 270))
    assert own.scores[0, 0] == pytest.approx(upright.scores[0, 0])  # the query's own win


def test_answer_names_queries_and_search_in_one_call(searcher, image_index):
    index, paths, _ = image_index
    first = searcher.store.find_path(str(paths[0].resolve()))
    answers = searcher.answer([paths[1], first.id, Query(id=first.id, name="mine")], k=2)
    assert [a.query for a in answers] == [str(paths[1]), first.path, "mine"]
    assert answers[1].hits[0].id == first.id and answers[1].hits[0].score == pytest.approx(
        1.0, abs=1e-4
    )
    d = answers[0].to_dict()
    assert d["query"] == str(paths[1]) and [h["rank"] for h in d["results"]] == [1, 2]
    one = search(index, [paths[1]], k=2)  # the module function: open, search, join, close
    assert [h.id for h in one[0].hits] == [h.id for h in answers[0].hits]


def test_mismatched_extractor_refused(image_index):
    index, _, extractor = image_index
    with IndexStore.open(index) as store, pytest.raises(ConfigError, match="differ"):
        # other pooling: another descriptor space
        Searcher(store, extractor=_FakeExtractor(extractor.conf.replace(pooling="gem")))


class _FakeExtractor:
    def __init__(self, conf):
        self.conf = conf


def test_reindexing_a_changed_file_keeps_its_metadata(tmp_path, make_extractor):
    extractor = make_extractor()
    folder = tmp_path / "images"
    paths = write_images(folder, 3, side=64)
    index = tmp_path / "index"
    meta = {"metadata": lambda p: {"label": p.stem}}
    index_folder(folder, index, extractor.conf, extractor=extractor, **meta)
    write_images(folder, 1, side=80)  # rewrites the first file with other content
    report = index_folder(folder, index, extractor.conf, extractor=extractor)  # no metadata
    assert report.updated == 1
    with Searcher.open(index, extractor=extractor) as s:
        rec = s.store.find_path(str(paths[0].resolve()))
        assert rec.metadata == {"label": paths[0].stem}
        assert s.results(s.search([rec.id], k=1))[0][0].metadata == {"label": paths[0].stem}


@pytest.mark.parametrize("stages", [["aqe"], ["alpha-qe"], ["dba"], ["dba", "alpha-qe"]])
def test_rerank_stages_keep_the_contract(searcher, image_index, stages):
    _, paths, _ = image_index
    s = searcher.with_stages(stages)
    ranking = s.search(paths[:1], k=4)
    assert ranking.scores.shape == ranking.ids.shape == (1, 4)
    assert ranking.ids[0, 0] == s.store.find_path(str(paths[0].resolve())).id
    assert len(set(ranking.ids[0].tolist())) == 4 and np.all(np.diff(ranking.scores[0]) <= 1e-6)
    assert s.search([int(ranking.ids[0, 0])], k=4).ids[0, 0] == ranking.ids[0, 0]


def test_unknown_rerank_stage_is_refused(searcher, image_index):
    index, _, _ = image_index
    with pytest.raises(ConfigError, match="alpha-qe"):
        searcher.with_stages(["nope"])
    with pytest.raises(ConfigError, match="alpha-qe"):
        Searcher.open(index, rerank=["nope"])


def test_stored_dba_follows_reindexing(tmp_path, make_extractor):
    extractor = make_extractor()
    folder = tmp_path / "images"
    write_images(folder, 5, side=64)
    index = tmp_path / "index"
    index_folder(folder, index, extractor.conf, extractor=extractor)
    with Searcher.open(index, rerank=["dba"], extractor=extractor) as s:
        s.search([1], k=2)  # computes the DBA and stores it (the directory is writable)
    write_images(folder / "more", 2, side=72)
    index_folder(folder, index, extractor.conf, extractor=extractor)  # the DBA must follow
    with IndexStore.open(index) as store:
        dba = DBAIndex.load(index / DBA_NAME, store.vector_source())
        assert dba is not None and dba.is_current() and len(dba) == 7


# -- vector and id queries, errors -----------------------------------------------------------


def test_vector_and_id_queries(vectors):
    root, x = vectors
    with Searcher.open(root) as s:
        by_id = s.search([5, np.int64(9)], k=3)
        assert by_id.ids[:, 0].tolist() == [5, 9]
        np.testing.assert_allclose(by_id.scores[:, 0], 1.0, atol=1e-5)
        by_vector = s.search([x[4], x[8]], k=3)  # (D,) vectors, a list or an (n, D) array
        np.testing.assert_array_equal(by_vector.ids, by_id.ids)
        np.testing.assert_array_equal(s.search(x[[4, 8]], k=3).ids, by_id.ids)
        brute = np.argsort(-(x @ x[4]), kind="stable")[:3] + 1
        assert by_vector.ids[0].tolist() == brute.tolist()
        # (R, D) views of one query: fused, rotated views lowered by the penalty
        views = np.stack([x[20], x[30]])
        fused = s.search([Query(vector=views, rotations=(0, 90))], k=2)
        assert fused.ids[0].tolist() == [21, 31]
        assert fused.scores[0, 1] == pytest.approx(1.0 - s.conf.rotation_penalty, abs=1e-5)
        assert s.search([], k=3).ids.shape == (0, 3)
        assert s.search([1], k=100).ids[0, 60:].tolist() == [-1] * 40  # padded past the index


def test_bad_queries_are_refused_clearly(vectors, tmp_path):
    root, x = vectors
    with IndexStore.open(root, writable=True) as w:
        (bad,) = w.add([NewImage(path="/img/broken.jpg", error="cannot decode")], x[:0])
    with Searcher.open(root) as s:
        with pytest.raises(ConfigError, match=f"{D} values"):
            s.search([np.zeros(7, np.float32)])
        with pytest.raises(ConfigError, match="no image with id 999"):
            s.search([x[0], 999])
        with pytest.raises(ConfigError, match=f"image id {bad} .*broken.jpg.*cannot decode"):
            s.search([bad])
        with pytest.raises(ConfigError, match=r"2 query views but .* rotations are \(0,\)"):
            s.search([Query(vector=x[:2])])  # the index's defaults name one angle
        for one in ("q.jpg", x[0], Query(id=1)):
            with pytest.raises(ConfigError, match="list of queries"):
                s.search(one)  # type: ignore[arg-type]


def test_answer_reports_failed_queries_beside_the_good_ones(vectors, tmp_path):
    root, x = vectors
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    queries = [x[4], tmp_path / "bad.jpg", 999, Query(id=9), b"\xff\xd8 junk", x[:1]]
    done: list[tuple[int, int]] = []
    with Searcher.open(root) as s:
        answers = s.answer(queries, k=2, errors="report", progress=lambda *p: done.append(p))
        with pytest.raises(ImageError, match=r"bad\.jpg"):
            s.answer(queries[:2], k=2)  # errors="raise", the default
        with pytest.raises(ConfigError, match="errors must be one of raise, report"):
            s.answer(queries, errors="ignore")
    kinds = [type(a.error).__name__ for a in answers]
    assert kinds == ["NoneType", "ImageError", "ConfigError", "NoneType", "ImageError", "NoneType"]
    assert [a.hits[0].id for a in answers if a.error is None] == [5, 9, 1]
    assert done[-1] == (6, 6) and len(done) == 6
    failed = answers[1].to_dict()
    assert set(failed) == {"query", "error"} and "bad.jpg" in failed["error"]
    assert "\n" not in failed["error"] and answers[1].hits == []
    assert answers[2].to_dict()["error"].startswith("no image with id 999")


def test_a_reader_sees_other_processes_commits_at_the_next_search(vectors):
    root, x = vectors
    with Searcher.open(root) as s:
        assert len(s) == 60
        with IndexStore.open(root, writable=True) as writer:
            (new,) = writer.add([NewImage(path="/img/new.jpg")], -x[:1])
            writer.remove([2])
        found = s.search([-x[0], x[1]], k=2)
        assert found.ids[0, 0] == new and 2 not in found.ids
        assert len(s) == 60  # 60 + 1 - 1


# -- stages composed through the Searcher -----------------------------------------------------


class FakeFeatures:
    """Stands in for IndexFeatures: every query has features, no files are read."""

    def __init__(self, conf: VerifyConf) -> None:
        self.conf = conf
        self.timings: dict[str, float] = {}
        self.asked: list[str] = []

    def of_query(self, query: Query, side=None, keypoints=None) -> dict:
        self.asked.append(query.label)
        return {"query": query.label}


class FakeVerifier(GeometricVerifier):
    """The verify stage with made-up inlier counts per candidate id."""

    def __init__(self, counts: dict[int, int], conf: VerifyConf) -> None:
        super().__init__(FakeFeatures(conf), conf)  # type: ignore[arg-type]
        self.counts = counts
        self.verified: list[list[int]] = []

    def inliers(self, query: dict, ids: list[int]) -> np.ndarray:
        self.verified.append(list(ids))
        return np.array([self.counts.get(i, 0) for i in ids], np.int64)


def run_stages(store: IndexStore, stages, raw: np.ndarray, k: int) -> Ranking:
    """The reference: the first-stage search, then each stage by hand (one upright view)."""
    depth, outs = stage_depths(stages, k)
    scores, ids = store.search(raw[None], depth)
    ranking = Ranking(scores[0], ids[0])
    ctx = QueryContext(Query(vector=raw), store.vector_source().to_index_space(raw[None])[0])
    for stage, out in zip(stages, outs, strict=True):
        ranking = stage(ctx, ranking, out)
    return ranking.fit(k)


def test_stages_compose_through_the_searcher(vectors):
    root, x = vectors
    conf = VerifyConf(features="rootsift", budget=4, fusion="inliers")
    with IndexStore.open(root) as store:
        source = store.vector_source()
        qe = QueryExpansion(source, QEConf(n=3, alpha=1.0), "alpha-qe")
        dba = DBARerank(DBAState(store, 3, 1.0), DBAConf(k=3, alpha=1.0), "dba")
        first = Searcher(store).search([x[10]], k=6)
        shortlist = Searcher(store, stages=[qe, dba]).search([x[10]], k=6)
        counts = {int(shortlist.ids[0, 2]): 40, int(shortlist.ids[0, 3]): 12}
        verifier = FakeVerifier(counts, conf)
        s = Searcher(store, stages=[qe, dba, verifier])
        got = s.search([x[10], Query(id=11, name="q")], k=6)
        want = run_stages(store, [qe, dba, verifier], x[10], 6)
        np.testing.assert_array_equal(got.ids[0], want.ids)
        np.testing.assert_allclose(got.scores[0], want.scores, atol=1e-6)
        assert not np.array_equal(shortlist.scores, first.scores)  # the stages did something
        # verify: the top `budget` re-ordered by inliers, the rest below with -1
        top = shortlist.ids[0]
        assert got.ids[0].tolist() == [top[2], top[3], top[0], top[1], top[4], top[5]]
        assert got.inliers[0].tolist() == [40, 12, 0, 0, -1, -1]
        assert verifier.verified[0] == top[:4].tolist()
        assert verifier.features.asked[:2] == ["<vector>", "q"]
        hits = s.results(got)[0]
        assert [h.inliers for h in hits] == [40, 12, 0, 0, None, None]
        assert hits[0].to_dict()["inliers"] == 40 and "inliers" not in hits[4].to_dict()


def test_verify_stage_on_a_hand_made_ranking():
    stage = FakeVerifier({7: 5, 9: 30}, VerifyConf(features="rootsift", budget=3, fusion="inliers"))
    assert stage.depth == 3 and stage.name == "verify"
    ctx = QueryContext(Query(id=1), np.zeros(4, np.float32))
    made = Ranking.of([0.9, 0.8, 0.7, 0.6, -np.inf], [4, 7, 9, 2, -1])
    out = stage(ctx, made, 4)
    assert out.ids.tolist() == [9, 7, 4, 2] and out.inliers.tolist() == [30, 5, 0, -1]
    assert out.scores[3] == pytest.approx(0.6)  # not verified: keeps its similarity
    assert stage.verified == [[4, 7, 9]]
    # fewer candidates than the budget: the padding stays last, unverified
    short = stage(ctx, Ranking.of([0.5, -np.inf], [7, -1]), 3)
    assert short.ids.tolist() == [7, -1, -1] and short.inliers.tolist() == [5, -1, -1]
    assert stage.features.asked == ["id:1"]  # the query's features: once per query
    assert stage(ctx, made, 0).ids.shape == (0,)


def test_verify_keeps_a_ranking_without_query_features(vectors):
    root, x = vectors
    conf = VerifyConf(features="rootsift", budget=3)
    with IndexStore.open(root) as store:
        resources = StageResources(store)
        stage = resources.verifier(conf)  # the real one: a vector query has no image
        got = Searcher(store, stages=[stage], resources=resources).search([x[0]], k=4)
        plain = Searcher(store).search([x[0]], k=4)
        np.testing.assert_array_equal(got.ids, plain.ids)
        assert got.inliers.tolist() == [[-1, -1, -1, -1]]
        assert got.fields.keys() == {INLIERS}


def test_siblings_share_the_extractor_and_the_stage_state(vectors, monkeypatch):
    root, _ = vectors
    made: list[object] = []

    class CountingExtractor:
        def __init__(self, conf):
            self.conf = conf
            made.append(self)

    monkeypatch.setattr(search_module, "Extractor", CountingExtractor)
    with Searcher.open(root, rerank=["dba"]) as s:
        sibling = s.with_stages(["dba", "aqe"])  # before the extractor was ever needed
        other = sibling.with_stages(["verify"], {"features": "orb"})
        assert s.extractor is sibling.extractor is other.extractor and len(made) == 1
        assert sibling.resources is s.resources and sibling.store is s.store
        assert sibling.stages[0].state is s.stages[0].state
        assert [st.name for st in sibling.stages] == ["dba+aqe"]
        assert other.stages[0].conf.features == "orb"


# -- rotation views and hits -------------------------------------------------------------------


def test_fuse_max_is_the_rotation_fusion(vectors):
    root, x = vectors
    views = np.stack([x[0], x[5]])
    with Searcher.open(root) as s:
        got = s.search([Query(vector=views, rotations=(0, 180))], k=5)
        scores, ids = s.store.search(views, 100)
        scores[1] -= s.conf.rotation_penalty
        want = fuse_max(scores, ids, 5)
        np.testing.assert_array_equal(got.ids[0], want.ids)
        np.testing.assert_allclose(got.scores[0], want.scores)


def test_hit_to_dict():
    hit = Hit(1, 7, "/a.jpg", 0.123456789, {"label": "x"}, 5)
    assert hit.to_dict() == {
        "rank": 1,
        "id": 7,
        "path": "/a.jpg",
        "score": 0.123457,
        "metadata": {"label": "x"},
        "inliers": 5,
    }


# -- the DBA: computed once per index, stored when it can be ---------------------------------


@pytest.fixture
def closed(vectors):
    return vectors[0]


NEW_PROCESS = """
import sys
from lookalike.search import Searcher
with Searcher.open(sys.argv[1], rerank=["dba"]) as s:
    ids = s.search([1, 7, 30], k=4).ids
    state = s.resources.dba(5, 1.0)
    print(state.computed, ",".join(map(str, ids.ravel().tolist())))
"""


def test_searches_compute_the_dba_once_and_store_it(
    closed, computations: list[int], caplog
) -> None:
    log = caplog.at_level(logging.INFO, logger="lookalike.rerank.dba_stage")
    with log, Searcher.open(closed, rerank=["dba"]) as s:
        got = [s.search([1, 7, 30], k=4).ids for _ in range(3)]
        sibling = s.with_stages(["dba", "alpha-qe"])  # the same (k, alpha): shared
        sibling.search([1], k=4)
        state = s.resources.dba(5, 1.0)
        assert state.computed == 1 and state.stored and len(computations) == 1
        assert sibling.stages[0].state is state
    assert all(np.array_equal(g, got[0]) for g in got)
    assert "stored in dba.npz" in caplog.text
    assert (closed / DBA_NAME).exists()
    with IndexStore.open(closed) as reader:
        assert reader.manifest.dba == DBASettings(5, 1.0)
    mtime = (closed / DBA_NAME).stat().st_mtime_ns
    # a new process loads it: no computation, the same rankings
    proc = run_python(NEW_PROCESS, str(closed))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    computed, ids = out.split()
    assert computed == "0"
    assert [int(i) for i in ids.split(",")] == got[0].ravel().tolist()
    assert (closed / DBA_NAME).stat().st_mtime_ns == mtime


HOLD_LOCK = """
import sys
from lookalike.index import IndexStore
with IndexStore.open(sys.argv[1], writable=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("why", ["read-only", "unwritable", "locked"])
def test_kept_in_memory_when_it_cannot_be_stored(
    closed, why: str, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder, view = None, contextlib.nullcontext(closed)
    if why == "read-only":
        view = read_only_view(closed)
    elif why == "unwritable":  # what a read-only directory does, where chmod cannot

        def refuse(self, path, unique=False):  # type: ignore[no-untyped-def]
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(DBAIndex, "save", refuse)
    else:
        holder = run_python(HOLD_LOCK, str(closed), stdin=-1)
        assert holder.stdout.readline().strip() == "locked"
    try:
        log = caplog.at_level(logging.INFO, logger="lookalike.rerank.dba_stage")
        with view as index, log, Searcher.open(index, rerank=["dba"]) as s:
            first = s.search([3], k=5)
            again = s.search([3], k=5)
            state = s.resources.dba(5, 1.0)
            assert state.computed == 1 and not state.stored
    finally:
        if holder is not None:
            holder.communicate(input="", timeout=30)
    np.testing.assert_array_equal(first.ids, again.ids)
    assert "kept in memory" in caplog.text
    assert not (closed / DBA_NAME).exists() and not list(closed.glob("*.tmp"))
    with IndexStore.open(closed) as reader:
        assert reader.manifest.dba is None


def test_a_dba_of_other_settings_never_replaces_the_one_the_index_keeps(
    closed, computations: list[int]
) -> None:
    """A tuning run's DBA (other k / alpha) stays in memory: the index keeps its own."""
    with Searcher.open(closed, rerank=["dba"]) as s:
        s.search([1], k=3)
        kept = (closed / DBA_NAME).read_bytes()
        other = DBARerank(s.resources.dba(3, 0.5), DBAConf(k=3, alpha=0.5), "dba")
        tuned = Searcher(s.store, None, [other], conf=s.conf, resources=s.resources)
        tuned.search([1], k=3)
        assert not other.state.stored and len(computations) == 2
    assert (closed / DBA_NAME).read_bytes() == kept
    with IndexStore.open(closed) as reader:
        assert reader.manifest.dba == DBASettings(5, 1.0)
    with Searcher.open(closed, rerank=["dba"]) as s:
        s.search([1], k=3)
        assert s.resources.dba(5, 1.0).computed == 0 and len(computations) == 2


def test_a_reader_follows_another_writer_incrementally(closed, computations: list[int]) -> None:
    with Searcher.open(closed, rerank=["dba"]) as s:
        s.search([1], k=3)
        state = s.resources.dba(5, 1.0)
        mtime = (closed / DBA_NAME).stat().st_mtime_ns
        with IndexStore.open(closed, writable=True) as writer:  # another writer
            added = writer.add([NewImage(path=f"/new/{i}.jpg") for i in range(2)], unit(2, seed=60))
            writer.remove([5])
        ranking = s.search([added[0]], k=3)
        assert ranking.ids[0, 0] == added[0]
        index = state.current()
        assert state.computed == 1 and len(computations) == 1  # no full recomputation
        assert 0 < state.recomputed < len(index)
        assert 5 not in index.ids and set(added) <= set(index.ids.tolist())
        scratch = build_dba(s.store.vector_source(), 5, 1.0)
        np.testing.assert_array_equal(index.neighbours, scratch.neighbours)
        np.testing.assert_allclose(index.vectors, scratch.vectors, atol=1e-6)
    assert (closed / DBA_NAME).stat().st_mtime_ns == mtime  # a reader's stays in memory
