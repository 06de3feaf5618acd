"""ASMK*: the kernel against a plain transcription of its formula on a toy vocabulary, the
inverted file under add / remove / re-add and on disk, and the ``asmk`` stage on a small
index of photos with RootSIFT features, following the index's changes and combined with
``verify``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import photo

from lookalike.errors import ConfigError, IndexStateError
from lookalike.extract import get_preset
from lookalike.index import IndexStore
from lookalike.indexing import index_folder, remove_images
from lookalike.local.asmk import (
    AsmkIndex,
    aggregate,
    similarity,
    train_codebook,
    unit_rows,
    vocabulary_size,
)
from lookalike.local.conf import VerifyConf
from lookalike.local.provider import IndexFeatures
from lookalike.query import Query, QueryContext
from lookalike.ranking import Ranking
from lookalike.rerank import resolve_names
from lookalike.rerank.asmk_stage import ASMK_NAME, AsmkConf, AsmkStage, AsmkState
from lookalike.search import Searcher

D, WORDS = 4, 8


# -- the reference: ASMK* written out with loops ----------------------------------------------


def ref_aggregate(descriptors: np.ndarray, codebook: np.ndarray, assignment: int = 1) -> dict:
    """``{word: list of bits}``: residual sums of the descriptors assigned to each word."""
    sums: dict[int, np.ndarray] = {}
    for x in descriptors:
        x = x / np.linalg.norm(x)
        dist = [float(((x - c) ** 2).sum()) for c in codebook]
        for word in np.argsort(dist, kind="stable")[:assignment]:
            sums[int(word)] = sums.get(int(word), 0) + (x - codebook[word])
    return {w: [1 if v > 0 else 0 for v in s] for w, s in sums.items()}


def ref_kernel(a: dict, b: dict, alpha: float, tau: float) -> float:
    total = 0.0
    for word, bits in a.items():
        if word in b:
            h = sum(1 for x, y in zip(bits, b[word], strict=True) if x != y)
            u = 1 - 2 * h / len(bits)
            if u > tau:
                total += np.sign(u) * abs(u) ** alpha
    return total


def ref_similarity(a: dict, b: dict, alpha: float = 3.0, tau: float = 0.0) -> float:
    norm = np.sqrt(ref_kernel(a, a, alpha, tau) * ref_kernel(b, b, alpha, tau))
    return ref_kernel(a, b, alpha, tau) / norm if norm > 0 else 0.0


@pytest.fixture
def toy() -> dict:
    """An 8-word vocabulary in 4-d, six images (one without descriptors), three queries."""
    rng = np.random.default_rng(3)
    codebook = unit_rows(rng.normal(size=(WORDS, D)))
    images = [rng.normal(size=(n, D)).astype(np.float32) for n in (12, 7, 3, 9, 0, 15)]
    near = images[0] + 0.1 * rng.normal(size=images[0].shape).astype(np.float32)
    queries = [near, rng.normal(size=(10, D)).astype(np.float32), images[3][:4]]
    return {
        "codebook": codebook,
        "images": images,
        "ids": [10, 4, 7, 21, 3, 15],
        "queries": queries,
    }


def built(toy: dict, order: list[int] | None = None) -> AsmkIndex:
    index = AsmkIndex(toy["codebook"])
    order = range(len(toy["ids"])) if order is None else order
    index.add([toy["ids"][i] for i in order], [toy["images"][i] for i in order])
    return index


@pytest.mark.parametrize(
    ("assignment", "alpha", "tau"), [(1, 3.0, 0.0), (2, 3.0, 0.0), (1, 1.0, 0.2)]
)
def test_search_scores_are_the_formula(toy, assignment, alpha, tau):
    index = built(toy)
    for query in toy["queries"]:
        scores, ids = index.search(query, 0, assignment, alpha, tau)
        q = ref_aggregate(query, toy["codebook"], assignment)
        ref = {
            i: ref_similarity(q, ref_aggregate(x, toy["codebook"]), alpha, tau)
            for i, x in zip(toy["ids"], toy["images"], strict=True)
        }
        assert sorted(ids.tolist()) == sorted(ref)
        np.testing.assert_allclose(scores, [ref[i] for i in ids], atol=1e-6)
        assert (np.diff(scores) <= 0).all()
    top, ids = index.search(toy["queries"][0], 2)
    assert ids[0] == 10 and top[0] > 0.5  # the noisy copy of image 10


def test_pairwise_similarity_and_aggregation(toy):
    cb = toy["codebook"]
    a, b = (aggregate(x, cb) for x in toy["images"][:2])
    ref = ref_aggregate(toy["images"][0], cb)
    assert a[0].tolist() == sorted(ref) and a[0].dtype == np.int32 and a[1].dtype == np.uint8
    assert [np.unpackbits(c)[:D].tolist() for c in a[1]] == [ref[w] for w in sorted(ref)]
    got = similarity(a, b, D)
    assert got == pytest.approx(ref_similarity(ref, ref_aggregate(toy["images"][1], cb)), abs=1e-6)
    assert similarity(a, a, D) == pytest.approx(1.0)
    empty = aggregate(np.zeros((0, D), np.float32), cb)
    assert empty[0].shape == (0,) and empty[1].shape == (0, 1) and similarity(a, empty, D) == 0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        aggregate(np.zeros((3, 5), np.float32), cb)
    with pytest.raises(ValueError, match="finite"):
        aggregate(np.full((2, D), np.nan, np.float32), cb)


def test_codebook_and_vocabulary_size():
    x = np.random.default_rng(0).normal(size=(800, 8)).astype(np.float32)
    one, two = train_codebook(x, 16, seed=1), train_codebook(x, 16, seed=1)
    assert one.shape == (16, 8) and one.dtype == np.float32 and np.array_equal(one, two)
    with pytest.raises(ValueError, match="k <= 800"):
        train_codebook(x, 801)
    sizes = [vocabulary_size(n) for n in (100, 624, 3000, 60_000, 10**9)]
    assert sizes == [0, 16, 32, 1024, 65536]


def test_add_remove_readd_equals_a_fresh_build(toy):
    rng = np.random.default_rng(9)
    index = built(toy, order=[0, 1, 2])
    index.add([21, 3], [toy["images"][3], toy["images"][4]])
    assert index.remove([4, 999]) == 1 and index.remove([4]) == 0
    new = rng.normal(size=(6, D)).astype(np.float32)  # image 7 with new content
    index.remove([7])
    index.add([7, 15, 4], [new, toy["images"][5], toy["images"][1]], tags=["b", "c", None])
    with pytest.raises(ValueError, match="new image ids"):
        index.add([15], [new])
    final = {**toy, "images": [*toy["images"][:2], new, *toy["images"][3:]]}
    fresh = built(final, order=[5, 2, 0, 4, 3, 1])
    assert len(index) == len(fresh) == 6 and index.ids.tolist() == [3, 4, 7, 10, 15, 21]
    assert index.tags_of()[7] == "b" and index.tags_of()[4] == ""
    for query in [*toy["queries"], new]:
        got, want = index.search(query, 0), fresh.search(query, 0)
        assert got[1].tolist() == want[1].tolist()
        np.testing.assert_allclose(got[0], want[0], atol=1e-12)
    index.remove(index.ids)
    scores, ids = index.search(toy["queries"][0], 3)
    assert len(index) == 0 and ids.tolist() == [-1] * 3 and np.isneginf(scores).all()


def test_save_load_round_trip_and_damage(toy, tmp_path):
    index = built(toy)
    index.meta = {"features": {"name": "toy"}, "version": [3, 0]}
    path = tmp_path / "asmk.npz"
    assert AsmkIndex.load(path) is None
    index.save(path)
    back = AsmkIndex.load(path)
    assert back.meta == index.meta and back.tags_of() == index.tags_of()
    for name in ("codebook", "ids", "counts", "words", "images", "codes"):
        assert np.array_equal(getattr(back, name), getattr(index, name)), name
    for query in toy["queries"]:
        assert np.array_equal(back.search(query, 0)[0], index.search(query, 0)[0])
    content = path.read_bytes()
    for damage in (content[: len(content) // 2], content[:100] + b"\xff" + content[101:]):
        path.write_bytes(damage)
        with pytest.raises(IndexStateError, match=r"asmk\.npz is damaged"):
            AsmkIndex.load(path)
    arrays = {n: getattr(index, n) for n in ("codebook", "ids", "tags", "counts", "words")}
    np.savez(
        path,
        header=np.array('{"format_version": 1}'),
        images=index.images + 1000,  # entries of no image held
        codes=index.codes,
        **arrays,
    )
    with pytest.raises(IndexStateError, match="damaged"):
        AsmkIndex.load(path)


# -- the stage on a small index ---------------------------------------------------------------

ROOTSIFT = VerifyConf(features="rootsift", max_keypoints=512, max_side=320, threshold_px=8)
CONF = get_preset("fast").replace(workers=0, image_size=128, query_rotations=(0,))
H = np.array([[0.9, 0.08, 20.0], [-0.06, 0.95, 12.0], [1e-4, 5e-5, 1.0]])
NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def warped(name: str, out: Path) -> Path:
    img = cv2.cvtColor(np.asarray(photo(name, 320)), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(out), cv2.warpPerspective(img, H, (img.shape[1], img.shape[0])))
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("asmk")
    (base / "photos").mkdir()
    for name in NAMES:
        photo(name, 320).save(base / "photos" / f"{name}.png")
    index_folder(base / "photos", base / "index", CONF, local=ROOTSIFT)
    return {"base": base, "queries": {n: warped(n, base / f"{n}-q.png") for n in NAMES}}


def ids_by_name(index: Path) -> dict[str, int]:
    with IndexStore.open(index) as store:
        return {Path(r.path).stem: r.id for r in store.records("ok")}


def asmk_only(stage: AsmkStage, query: Path, k: int = 0) -> list[int]:
    """The stage's ASMK ranking alone (weight 1) of an image query, from an empty ranking."""
    pure = AsmkStage(stage.state, stage.verify, AsmkConf(weight=1.0))
    context = QueryContext(
        Query(image=query), np.zeros(stage.state.store.vector_source().dim, np.float32)
    )
    out = pure(context, Ranking.empty(0), k or 100)
    return out.ids[out.ids >= 0].tolist()


def test_stage_ranks_and_follows_add_update_remove(collection, tmp_path):
    photos, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(collection["base"] / "photos", photos)
    index_folder(photos, index, CONF, local=ROOTSIFT)
    q = collection["queries"]
    with Searcher.open(index, ["asmk"]) as searcher:
        stage = searcher.stages[0]
        ids = ids_by_name(index)
        assert asmk_only(stage, q["astronaut"])[0] == ids["astronaut"]
        hits = searcher.results(searcher.search([q["astronaut"]], k=3))
        assert Path(hits[0][0].path).stem == "astronaut"
        state = stage.state
        codebook = state.current().codebook.copy()
        assert (state.computed, state.aggregated, state.stored) == (1, 5, True)
        photo("coins", 320).save(photos / "coins.png")  # added
        photo("immunohistochemistry", 320).save(photos / "chelsea.png")  # updated
        report = index_folder(photos, index, CONF)
        assert report.added == 1 and report.updated == 1
        remove_images(index, ids=[ids["coffee"]])
        new = ids_by_name(index)
        assert new["chelsea"] == ids["chelsea"] and "coffee" not in new
        hist = warped("immunohistochemistry", tmp_path / "hist.png")
        assert asmk_only(stage, warped("coins", tmp_path / "coins.png"))[0] == new["coins"]
        assert asmk_only(stage, hist)[0] == ids["chelsea"]
        for query in q.values():
            assert ids["coffee"] not in asmk_only(stage, query)
            assert ids["coffee"] not in searcher.search([query], k=0).ids
        assert state.computed == 1 and np.array_equal(state.current().codebook, codebook)
        assert state.aggregated == 5 + 2 and len(state.current()) == 5 and state.stored
    with Searcher.open(index, ["asmk"]) as searcher:  # a new process loads asmk.npz
        state = searcher.stages[0].state
        assert asmk_only(searcher.stages[0], hist)[0] == ids["chelsea"]
        assert (state.computed, state.aggregated) == (0, 0)


def test_writers_keep_the_stored_inverted_file_current_without_a_search(collection, tmp_path):
    """Like a stored DBA: ``lookalike index`` and ``remove`` bring ``asmk.npz`` to the
    images they leave (added, updated by content hash, removed), over the same codebook,
    before any search; an index that keeps none gets none."""
    photos, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(collection["base"] / "photos", photos)
    index_folder(photos, index, CONF, local=ROOTSIFT)
    assert not (index / ASMK_NAME).exists()
    with Searcher.open(index, ["asmk"]) as searcher:
        searcher.stages[0].state.current()  # built and stored by a search
    before = AsmkIndex.load(index / ASMK_NAME)
    ids = ids_by_name(index)
    photo("coins", 320).save(photos / "coins.png")
    photo("immunohistochemistry", 320).save(photos / "chelsea.png")
    index_folder(photos, index, CONF)
    remove_images(index, ids=[ids["coffee"]])
    after = AsmkIndex.load(index / ASMK_NAME)
    with IndexStore.open(index) as store:
        live = {r.id: r.content_hash for r in store.records("ok")}
        version = list(store.vector_source().version())
    assert after.tags_of() == live and after.meta["version"] == version
    assert after.tags_of()[ids["chelsea"]] != before.tags_of()[ids["chelsea"]]  # updated
    assert ids["coffee"] in before.tags_of() and ids["coffee"] not in after.tags_of()
    np.testing.assert_array_equal(after.codebook, before.codebook)
    with Searcher.open(index, ["asmk"]) as searcher:  # loaded as it is: nothing to follow
        state = searcher.stages[0].state
        assert asmk_only(searcher.stages[0], warped("coins", tmp_path / "c.png"))[0] == max(live)
        assert (state.computed, state.aggregated) == (0, 0)


def test_stored_state_of_other_settings_or_damaged_is_recomputed(collection, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lookalike.rerank.asmk_stage")
    index = tmp_path / "index"
    shutil.copytree(collection["base"] / "index", index)
    with Searcher.open(index, ["asmk"]) as searcher:
        searcher.stages[0].state.current()
    stored = AsmkIndex.load(index / ASMK_NAME)
    stored.meta["features"] = {"name": "sift"}
    stored.save(index / ASMK_NAME)
    with Searcher.open(index, ["asmk"]) as searcher:
        assert searcher.stages[0].state.current() is not None
        assert searcher.stages[0].state.computed == 1
    assert "other local features" in caplog.text
    (index / ASMK_NAME).write_bytes(b"not a zip")
    with Searcher.open(index, ["asmk"]) as searcher:
        assert searcher.stages[0].state.current() is not None
        assert searcher.stages[0].state.computed == 1
    assert "is damaged" in caplog.text


def test_asmk_then_verify_share_the_query_features(collection, monkeypatch):
    detected = []
    of_query = IndexFeatures.of_query

    def counting(self, query, *args, **kwargs):
        detected.append(query)
        return of_query(self, query, *args, **kwargs)

    monkeypatch.setattr(IndexFeatures, "of_query", counting)
    assert resolve_names(["verify", "asmk"]) == ["asmk", "verify"]
    with Searcher.open(collection["base"] / "index", ["verify", "asmk"]) as searcher:
        ranking = searcher.search([collection["queries"]["rocket"]], k=3)
        hits = searcher.results(ranking)
        assert [s.name for s in searcher.stages] == ["asmk", "verify"]
    assert Path(hits[0][0].path).stem == "rocket" and ranking.inliers[0, 0] >= 20
    assert (ranking.inliers[0] >= 0).all() and len(detected) == 1


def test_fusion_scores_the_union_and_lets_asmk_candidates_in(collection):
    ids = ids_by_name(collection["base"] / "index")
    with Searcher.open(collection["base"] / "index", ["asmk"]) as searcher:
        stage = searcher.stages[0]
        query = Query(image=collection["queries"]["rocket"])
        rocket = searcher.resources.source.vectors([ids["rocket"]])[0]
        context = QueryContext(query, rocket)  # as if the query's descriptor were rocket's
        out = stage(context, Ranking.of([0.9], [ids["camera"]]), 10)
        feats = stage.state.features.of_query(query)
        a_s, a_i = stage.state.current().search(feats["descriptors"], 0)
        asmk = dict(zip(a_i.tolist(), a_s.tolist(), strict=True))
    got = {i: s for i, s in zip(out.ids.tolist(), out.scores.tolist(), strict=True) if i >= 0}
    assert out.ids[0] == ids["rocket"]  # found by ASMK only, its global score looked up
    assert got[ids["rocket"]] == pytest.approx(0.5 * asmk[ids["rocket"]] + 0.5, abs=1e-5)
    assert got[ids["camera"]] == pytest.approx(0.5 * asmk[ids["camera"]] + 0.45, abs=1e-5)
    assert set(got) == {i for i, v in asmk.items() if v > 0} | {ids["camera"]}


def test_stage_edge_cases(collection):
    with Searcher.open(collection["base"] / "index", ["asmk"]) as searcher:
        stage = searcher.stages[0]
        ranking = Ranking.of([0.9, 0.2], [1, 2])
        vector = QueryContext(Query(vector=np.ones(searcher.store.dim, np.float32)), np.zeros(1))
        assert stage(vector, ranking, 2).ids.tolist() == [1, 2]
        image = QueryContext(Query(image=collection["queries"]["camera"]), np.zeros(1))
        assert stage(image, ranking, 0).ids.shape == (0,)
    with pytest.raises(ConfigError, match="weight"):
        AsmkConf(weight=1.5)
    with (
        IndexStore.open(collection["base"] / "index") as store,
        pytest.raises(ConfigError, match="binary"),
    ):
        AsmkState(store, SimpleNamespace(conf=VerifyConf(features="orb")))
