"""Geometric verification as a search stage: its settings, ``--rerank verify``, recognition
with inliers, ``match``. SIFT (no weights to load) unless a test says otherwise. How the
stored local features follow the index is in tests/test_local_sync.py.

The collection: five unrelated photos at 320 px, plus queries that are known homography
warps of one of them. The ``fast`` descriptor preset keeps indexing quick; what is tested
is the verification stage, not the global descriptor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from conftest import photo
from test_cli import cli, json_lines, one_line_error, summary

from lookalike.errors import ConfigError
from lookalike.extract import get_preset
from lookalike.index import IndexStore
from lookalike.indexing import index_folder
from lookalike.local import LocalFeatureStore, fuse_scores
from lookalike.local.conf import (
    VERIFY_PRESETS,
    VerifyConf,
    get_verify_preset,
    local_conf,
    local_preset,
    verify_changes,
)
from lookalike.local.provider import IndexFeatures
from lookalike.local.sync import sync_local
from lookalike.query import Query, QueryContext
from lookalike.ranking import NOT_VERIFIED, Ranking
from lookalike.recognize import Recognizer
from lookalike.rerank import resolve_names
from lookalike.rerank.verify import GeometricVerifier
from lookalike.search import Searcher

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera")
SIFT = VerifyConf(features="sift", max_keypoints=512, max_side=320, ratio=0.8, threshold_px=8)
CONF = get_preset("fast").replace(workers=0, image_size=128, query_rotations=(0,))
H_TRUE = np.array([[0.9, 0.08, 20.0], [-0.06, 0.95, 12.0], [1e-4, 5e-5, 1.0]])
WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights" / "aliked-n16.pth"


def write_photos(folder: Path, names=NAMES, side: int = 320) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        photo(name, side).save(path)
        paths.append(path)
    return paths


def warp(path: Path, out: Path, h: np.ndarray = H_TRUE) -> Path:
    """``path`` warped by the homography ``h`` (same size), written to ``out``."""
    img = cv2.imread(str(path))
    cv2.imwrite(str(out), cv2.warpPerspective(img, h, (img.shape[1], img.shape[0])))
    return out


def make_collection(base: Path) -> dict:
    """NAMES indexed with SIFT local features under ``base``, and two queries: a known warp
    of the first photo and a flat grey image."""
    paths = write_photos(base / "photos")
    index = base / "index"
    report = index_folder(base / "photos", index, CONF, local=SIFT)
    assert report.added == len(NAMES) and report.local_described == len(NAMES)
    queries = base / "queries"
    queries.mkdir()
    return {
        "base": base,
        "photos": paths,
        "index": index,
        "warped": warp(paths[0], queries / "astronaut-warped.png"),
        "flat": _flat(queries / "flat.png"),
    }


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """:func:`make_collection` (read-only for the tests)."""
    return make_collection(tmp_path_factory.mktemp("verify"))


def _flat(path: Path) -> Path:
    cv2.imwrite(str(path), np.full((200, 240, 3), 127, np.uint8))  # no texture: no keypoints
    return path


def copy_index(collection: dict, tmp_path: Path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(collection["index"], target)
    return target


# -- settings -----------------------------------------------------------------------------


def test_presets_are_valid_and_named():
    assert set(VERIFY_PRESETS) == {"default", "sqrt-inliers", "rootsift"}
    assert VERIFY_PRESETS["sqrt-inliers"] == VerifyConf(fusion="sim_sqrt_inliers")
    assert get_verify_preset("sqrt-inliers").fusion == "sim_sqrt_inliers"
    assert get_verify_preset("default") == VerifyConf()
    assert local_preset("rootsift") is VERIFY_PRESETS["rootsift"]
    assert local_preset("aliked") is VERIFY_PRESETS["default"]
    assert local_preset("orb") == VerifyConf(features="orb")
    with pytest.raises(ConfigError, match="default, sqrt-inliers, rootsift"):
        get_verify_preset("nope")
    with pytest.raises(ConfigError, match="sqrt-inliers"):
        get_verify_preset("seeds")  # the old name is gone


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": "surf"}, "sift, rootsift"),
        ({"budget": 0}, "budget"),
        ({"ratio": 1.5}, "ratio"),
        ({"model": "affine"}, "homography"),
        ({"fusion": "max"}, "sim_plus_inliers"),
        ({"threshold_px": 0}, "threshold_px"),
        ({"features": "sift", "weights": "x.pth"}, "weights"),
        ({"colour": 1}, "unknown verify settings"),
    ],
)
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        VerifyConf().replace(**change)


def test_local_conf_is_the_preset_of_the_features_with_the_changes(tmp_path):
    assert local_conf(None) is None
    assert local_conf("rootsift") == VERIFY_PRESETS["rootsift"]
    assert local_conf("aliked") == VerifyConf()
    got = local_conf("sift", max_keypoints=256, max_side=320, device="cuda")
    assert got == VerifyConf(features="sift", max_keypoints=256, max_side=320, device="cuda")
    weights = tmp_path / "aliked-n16.pth"
    weights.write_bytes(b"")
    relative = Path(os.path.relpath(weights))
    assert local_conf("aliked", weights=relative).weights == str(weights.resolve())


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((None,), {"max_keypoints": 256}, "--local-keypoints need --local NAME"),
        ((None,), {"max_side": 300, "weights": "w.pth"}, "--local-side, --local-weights need"),
        (("aliked",), {"weights": "missing.pth"}, "missing.pth: no such file"),
        (("sift",), {"max_side": 8}, "max_side"),
        (("orb",), {"max_keypoints": 0}, "max_keypoints"),
        (("surf",), {}, "sift, rootsift"),
    ],
)
def test_local_conf_errors(args, kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        local_conf(*args, **kwargs)
    assert "\n" not in str(error.value)


def test_verify_changes_name_only_what_a_search_changes(tmp_path):
    assert verify_changes() == {}
    assert verify_changes("rootsift") == {"features": "rootsift"}
    with pytest.raises(ConfigError, match="rootsift"):
        verify_changes("surf")
    assert verify_changes(budget=7, fusion="inliers", device="cpu") == {
        "budget": 7,
        "fusion": "inliers",
        "device": "cpu",
    }
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert verify_changes(weights=weights) == {"weights": str(weights.resolve())}
    with pytest.raises(ConfigError, match="no such file"):
        verify_changes(weights=tmp_path / "missing.pth")
    # the values are checked where they are applied
    with pytest.raises(ConfigError, match="sim_plus_inliers"):
        VerifyConf().replace(**verify_changes(fusion="max"))
    with pytest.raises(ConfigError, match="take no weights"):
        VerifyConf(features="sift").replace(**verify_changes(weights=weights))


def test_verify_is_moved_last_and_given_once():
    assert resolve_names(["verify", "aqe"]) == ["aqe", "verify"]
    assert resolve_names(["dba", "verify", "aqe"]) == ["dba+aqe", "verify"]
    assert resolve_names(["aqe"]) == ["aqe"]
    with pytest.raises(ConfigError, match="twice"):
        resolve_names(["verify", "verify"])


# -- the stage's re-ordering against a plain reference --------------------------------------


class FixedVerifier(GeometricVerifier):
    """The stage with given inlier counts instead of images."""

    def __init__(self, counts: dict[int, int], conf: VerifyConf) -> None:
        features = SimpleNamespace(conf=conf, timings={}, of_query=lambda *args: None)
        super().__init__(features, conf)  # type: ignore[arg-type]
        self.counts = counts
        self.asked: list[int] = []

    def inliers(self, query, ids):
        self.asked = list(ids)
        return np.array([self.counts.get(i, 0) for i in ids], np.int64)


def context(features: dict | None = None) -> QueryContext:
    """A query whose local features are already known (``None``: a vector query)."""
    query = Query(vector=np.ones(4, np.float32), features=features)
    return QueryContext(query, np.ones(4, np.float32))


@pytest.mark.parametrize("fusion", ["inliers", "sim_sqrt_inliers", "sim_plus_inliers"])
def test_reranks_the_budget_by_fused_score_and_keeps_the_rest(fusion):
    rng = np.random.default_rng(3)
    scores = np.sort(rng.uniform(0.2, 0.9, 12).astype(np.float32))[::-1]
    ids = np.arange(100, 112, dtype=np.int64)
    ids[-2:] = -1  # padding
    scores[-2:] = -np.inf
    counts = {int(i): int(rng.integers(0, 60)) for i in ids[:10]}
    stage = FixedVerifier(counts, VerifyConf(features="sift", budget=6, fusion=fusion))
    out = stage(context({}), Ranking(scores, ids), k=14)
    out_s, out_i, out_n = out.scores, out.ids, out.inliers
    assert stage.asked == list(range(100, 106))  # only the budget is verified
    # reference: fuse the top 6, sort them (stable), append the others unchanged
    fused = fuse_scores(scores[:6], np.array([counts[i] for i in range(100, 106)]), fusion)
    order = sorted(range(6), key=lambda j: -fused[j])
    assert out_i[:6].tolist() == [100 + j for j in order]
    np.testing.assert_allclose(out_s[:6], fused[order], rtol=1e-6)
    assert out_n[:6].tolist() == [counts[100 + j] for j in order]
    assert out_i[6:10].tolist() == list(range(106, 110))
    np.testing.assert_array_equal(out_s[6:10], scores[6:10])
    assert out_n[6:].tolist() == [NOT_VERIFIED] * 8
    assert out_i[10:].tolist() == [-1] * 4 and np.isneginf(out_s[10:]).all()
    assert out_s.dtype == np.float32 and out_i.dtype == np.int64 and out_n.dtype == np.int64


def test_inliers_fusion_orders_by_inliers_and_ties_by_similarity():
    sim = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    stage = FixedVerifier({10: 4, 11: 100, 12: 0, 13: 25}, VerifyConf(fusion="inliers"))
    out = stage(context({}), Ranking(sim, np.array([10, 11, 12, 13])), k=4)
    assert out.ids.tolist() == [11, 13, 10, 12] and out.inliers.tolist() == [100, 25, 4, 0]
    stage = FixedVerifier({}, VerifyConf(fusion="inliers"))  # equal inliers
    out = stage(context({}), Ranking(sim, np.array([1, 2, 3, 4])), k=4)
    assert out.ids.tolist() == [1, 2, 3, 4]


def test_k_cuts_and_all_padding_verifies_nothing():
    stage = FixedVerifier({1: 50}, VerifyConf(features="sift"))
    out = stage(context({}), Ranking.of([0.5, 0.4], [0, 1]), k=1)
    assert out.ids.tolist() == [1] and out.inliers.tolist() == [50]
    stage.asked = []
    out = stage(context({}), Ranking.empty(3), k=2)
    assert out.ids.tolist() == [-1, -1] and out.inliers.tolist() == [NOT_VERIFIED] * 2
    assert stage.asked == []


def test_a_query_without_an_image_keeps_its_ranking():
    stage = FixedVerifier({1: 50}, VerifyConf(features="sift"))
    ranking = Ranking.of([0.5, 0.4, 0.3], [0, 1, 2])
    out = stage(context(None), ranking, k=2)
    assert out.ids.tolist() == [0, 1] and out.scores.tolist() == pytest.approx([0.5, 0.4])
    assert out.inliers.tolist() == [NOT_VERIFIED] * 2 and stage.asked == []


def test_the_verifier_needs_the_providers_features():
    with pytest.raises(ConfigError, match="differ"):
        GeometricVerifier(SimpleNamespace(conf=SIFT), SIFT.replace(max_side=640))  # type: ignore[arg-type]


# -- search with verification -----------------------------------------------------------------


def verified(index: Path, queries: list, k: int, rerank=("verify",), verify=None):
    """``(ranking, hits, the verify stage's timings)`` of one search."""
    with Searcher.open(index, list(rerank), verify) as searcher:
        ranking = searcher.search(queries, k)
        hits = searcher.results(ranking)
        timings = dict(searcher.stages[-1].timings) if "verify" in rerank else {}
    return ranking, hits, timings


def first_name(hits: list) -> str:
    return Path(hits[0][0].path).name


def test_verify_puts_the_warped_photo_first_with_many_inliers(collection):
    ranking, hits, timings = verified(collection["index"], [collection["warped"]], 5)
    assert first_name(hits) == "astronaut.png"
    assert ranking.inliers[0, 0] >= 30  # the true homography explains many matches
    assert (ranking.inliers[0, 1:] < 15).all()  # unrelated photos: chance level
    assert ranking.scores[0, 0] > 1.0  # similarity + a full verification bonus
    assert hits[0][0].inliers == ranking.inliers[0, 0]
    assert timings["features"] == 0.0  # all candidate features came from the store
    assert set(timings) == {"features", "load", "match", "ransac"}


def test_verify_composes_with_descriptor_stages(collection):
    query = Query(image=collection["warped"])
    with Searcher.open(collection["index"], ["alpha-qe", "verify"]) as searcher:
        got = searcher.search([query], k=3)
        # reference: the verify stage applied by hand to the alpha-qe ranking of all images
        qe = searcher.with_stages(["alpha-qe"]).search([query], k=0)
        verifier = searcher.stages[-1]
        ref = verifier(QueryContext(query, np.zeros(0, np.float32)), qe[0], 3)
        top = Path(searcher.results(got)[0][0].path).name
    assert [s.name for s in searcher.stages] == ["alpha-qe", "verify"]
    assert top == "astronaut.png"
    assert (
        got.ids[0].tolist() == ref.ids.tolist() and got.inliers[0].tolist() == ref.inliers.tolist()
    )
    np.testing.assert_allclose(got.scores[0], ref.scores, rtol=1e-6)
    assert (got.inliers >= 0).all()  # budget 100 > k: every result returned was verified


def test_k_all_and_a_small_budget_put_verified_results_first(collection):
    plain, _, _ = verified(collection["index"], [collection["warped"]], 0, rerank=())
    got, _, _ = verified(collection["index"], [collection["warped"]], 0, verify={"budget": 2})
    s, i, n = got.scores, got.ids, got.inliers
    assert i.shape == (1, len(NAMES)) and sorted(i[0].tolist()) == sorted(plain.ids[0].tolist())
    assert (n[0, :2] >= 0).all() and (n[0, 2:] == NOT_VERIFIED).all()
    assert set(i[0, :2].tolist()) == set(plain.ids[0, :2].tolist())  # the budget: top 2
    assert i[0, 2:].tolist() == plain.ids[0, 2:].tolist()  # the rest keep their order
    np.testing.assert_allclose(s[0, 2:], plain.scores[0, 2:], rtol=1e-6)
    assert (np.diff(s[0]) <= 1e-6).all()  # sim_plus_inliers keeps scores descending


def test_query_without_local_features_keeps_the_global_order(collection):
    with Searcher.open(collection["index"], ["verify"]) as searcher:
        feats = searcher.stages[-1].features.of_query(Query(image=collection["flat"]))
    assert len(feats["keypoints"]) == 0
    plain, _, _ = verified(collection["index"], [collection["flat"]], 5, rerank=())
    got, _, _ = verified(collection["index"], [collection["flat"]], 5)
    assert got.ids.tolist() == plain.ids.tolist()
    np.testing.assert_allclose(got.scores, plain.scores, rtol=1e-6)  # sim + 0 bonus
    assert got.inliers.tolist() == [[0] * 5]


def test_search_by_id_verifies_with_the_stored_features(collection):
    got, _, timings = verified(collection["index"], [Query(id=2)], 2)
    assert got.ids[0, 0] == 2 and got.inliers[0, 0] > 200  # itself: every match an inlier
    assert got.inliers[0, 1] < 15
    assert timings["features"] == 0.0  # the query's features too came from the store


def test_cropped_query_is_detected_at_its_whole_image_scale(collection, tmp_path):
    big = tmp_path / "big.png"
    photo("astronaut", 640).save(big)  # twice the indexed size; the crop is its top-left
    query = Query(image=big, box=(0, 0, 320, 320))
    with Searcher.open(collection["index"], ["verify"]) as searcher:
        feats = searcher.stages[-1].features.of_query(query)
        got = searcher.search([query], 1)
        top = Path(searcher.results(got)[0][0].path).name
    assert feats["image_size"] == (320, 320)  # keypoints in pixels of the crop
    assert feats["keypoints"].max() < 320
    assert top == "astronaut.png" and got.inliers[0, 0] >= 20


def test_query_detection_side_and_budget(collection, tmp_path):
    """``query_side`` resizes the whole query photo (up, too) before detection and
    ``query_keypoints`` sets its budget; keypoints stay in pixels of the photo, the database
    images' extractor is untouched, and each setting's features are computed once."""
    small = tmp_path / "small.png"
    photo("astronaut", 200).save(small)
    with Searcher.open(collection["index"], ["verify"]) as searcher:
        features = searcher.stages[-1].features
        native = features.of_query(Query(image=small))
        large = features.of_query(Query(image=small), side=640, keypoints=2000)
        few = features.of_query(Query(image=small), side=640, keypoints=50)
        crop = features.of_query(Query(image=small, box=(0, 0, 100, 100)), side=640)
        assert features.extractor.max_side == features.conf.max_side
    assert len(large["keypoints"]) > 2 * len(native["keypoints"])  # 3.2x larger: more detail
    assert len(few["keypoints"]) == 50
    for feats, side in ((large, 200), (crop, 100)):
        assert feats["image_size"] == (side, side)
        assert feats["keypoints"].min() >= -0.5 and feats["keypoints"].max() < side
    np.testing.assert_allclose(few["keypoints"], large["keypoints"][:50], atol=1e-4)

    conf = VerifyConf(features="orb", query_side=640, query_keypoints=300)
    calls = []

    class Counting:
        def of_query(self, query, side, keypoints):
            calls.append((side, keypoints))
            return {"asked": (side, keypoints)}

    from lookalike.rerank.verify import query_features

    ctx = QueryContext(Query(image=small), np.ones(4, np.float32))
    first = query_features(ctx, Counting(), conf)  # type: ignore[arg-type]
    again = query_features(ctx, Counting(), conf)  # type: ignore[arg-type]
    other = query_features(ctx, Counting(), conf.replace(query_side=None))  # type: ignore
    assert first is again and first["asked"] == (640, 300)
    assert other["asked"] == (None, 300) and calls == [(640, 300), (None, 300)]


def test_query_detection_settings_are_validated():
    assert VerifyConf().query_detection() == (None, 512)
    assert VerifyConf(query_side=1024, query_keypoints=2048).query_detection() == (1024, 2048)
    for bad in (
        {"query_side": 16},
        {"query_side": 0},
        {"query_keypoints": -1},
        {"query_side": True},
    ):
        with pytest.raises(ConfigError, match="query_"):
            VerifyConf(**bad)


def test_empty_and_one_image_indexes(tmp_path):
    one = tmp_path / "one"
    write_photos(one, names=("coffee",))
    index_folder(one, tmp_path / "idx1", CONF, local=SIFT)
    got, _, _ = verified(tmp_path / "idx1", [one / "coffee.png"], 3)
    with IndexStore.open(tmp_path / "idx1", writable=True) as store:
        (only,) = [r.id for r in store.records("ok")]
        n = got.inliers
        assert got.ids.tolist() == [[only, -1, -1]] and n[0, 0] > 100
        assert n[0, 1:].tolist() == [-1, -1]
        store.remove([only])
        sync_local(store)
        with LocalFeatureStore(store.path, "sift", create=False) as local:
            assert len(local) == 0
    got, _, _ = verified(tmp_path / "idx1", [one / "coffee.png"], 3)
    assert got.ids.tolist() == [[-1, -1, -1]] and got.inliers.tolist() == [[-1, -1, -1]]


def test_index_without_local_features_computes_and_caches_them(collection, tmp_path):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)
    _, _, timings = verified(index, [collection["warped"]], 5, verify=SIFT)
    assert timings["features"] > 0 and (index / "local" / "local.sqlite").exists()
    got, hits, timings = verified(index, [collection["warped"]], 5, verify=SIFT)
    assert timings["features"] == 0.0  # all cached now
    assert first_name(hits) == "astronaut.png"
    # removing an image forgets its lazily cached features too
    top = int(got.ids[0, 0])
    with IndexStore.open(index, writable=True) as store:
        store.remove([top])
        sync_local(store, compute=False)
        with LocalFeatureStore(index, "sift", create=False) as local:
            assert top not in local and len(local) == len(NAMES) - 1


def test_unwritable_index_keeps_computed_features_in_memory(collection, tmp_path, monkeypatch):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(index / "local"))

    monkeypatch.setattr("lookalike.local.provider.open_local_store", refuse)
    with Searcher.open(index, ["verify"], SIFT) as searcher:
        first = searcher.search([collection["warped"]], 5)
        assert searcher.stages[-1].timings["features"] > 0
        again = searcher.search([collection["warped"]], 5)
        assert searcher.stages[-1].timings["features"] == 0.0  # from memory
    assert not (index / "local").exists()
    for name in ("scores", "ids", "inliers"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))


def test_a_store_that_refuses_writes_falls_back_to_memory(collection, tmp_path, monkeypatch):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)
    verified(index, [collection["warped"]], 2, verify=SIFT.replace(budget=2))  # caches 2

    def readonly(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(LocalFeatureStore, "put_many", readonly)
    with Searcher.open(index, ["verify"], SIFT) as searcher:
        got = searcher.search([collection["warped"]], 5)
        assert searcher.stages[-1].timings["features"] > 0  # 3 computed, kept in memory
        again = searcher.search([collection["warped"]], 5)
        assert searcher.stages[-1].timings["features"] == 0.0
        assert Path(searcher.results(got)[0][0].path).name == "astronaut.png"
    np.testing.assert_array_equal(again.ids, got.ids)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a busy shared 2-core machine more threads only spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_aliked_verification_when_the_weights_are_on_disk(tmp_path):
    if not WEIGHTS.is_file():
        pytest.skip(f"ALIKED weights {WEIGHTS} are missing")
    photos = write_photos(tmp_path / "photos", names=("astronaut", "coffee", "rocket"), side=256)
    conf = VerifyConf(weights=str(WEIGHTS), max_keypoints=256, max_side=256)
    index_folder(tmp_path / "photos", tmp_path / "idx", CONF, local=conf)
    query = warp(photos[0], tmp_path / "q.png")
    got, hits, _ = verified(tmp_path / "idx", [query], 3)  # weights path recorded in the index
    assert first_name(hits) == "astronaut.png"
    assert got.inliers[0, 0] >= 30 and (got.inliers[0, 1:] < 15).all()


# -- recognition ------------------------------------------------------------------------------


def test_recognize_with_inliers_confidence(tmp_path):
    gallery = tmp_path / "gallery"
    for name in ("astronaut", "coffee", "rocket"):
        write_photos(gallery / name, names=(name,))
    index_folder(
        gallery,
        tmp_path / "idx",
        CONF,
        local=SIFT,
        metadata=lambda p: {"label": p.parent.name},
    )
    queries = tmp_path / "q"
    queries.mkdir()
    known = warp(gallery / "coffee" / "coffee.png", queries / "coffee.png")
    stranger = tmp_path / "q" / "chelsea.png"
    photo("chelsea", 320).save(stranger)
    with (
        Searcher.open(tmp_path / "idx") as searcher,
        pytest.raises(ConfigError, match="needs geometric verification"),
    ):
        Recognizer(searcher, k=3, confidence="inliers")
    with Searcher.open(tmp_path / "idx", ["verify"]) as searcher:
        right, wrong = Recognizer(searcher, k=3, confidence="inliers").predict([known, stranger])
    assert right.label == "coffee" and right.confidence >= 30
    assert right.neighbours[0].inliers == right.confidence  # the best verified neighbour
    assert wrong.confidence < 15 < right.confidence


# -- command line ---------------------------------------------------------------------------


def test_cli_index_local_search_verify_and_remove(collection, tmp_path, capsys):
    index = tmp_path / "idx"
    photos = collection["base"] / "photos"
    args = ("index", photos, "--index", index, "--preset", "fast", "--workers", "0", "-q")
    rc, out, err = cli(capsys, *args, "--local", "sift", "--local-side", "320")
    assert rc == 0, err
    assert summary(out)["local"] == f"{len(NAMES)} images described"
    rc, out, err = cli(capsys, "info", "--index", index, "--json")
    local = json.loads(out)["local"]
    assert local["extractor"]["name"] == "sift" and local["extractor"]["max_side"] == 320
    assert local["images"] == len(NAMES) and local["recorded"] is True
    rc, out, err = cli(capsys, "info", "--index", index)
    assert re.search(r"local +sift \(512 keypoints at 320 px\): 5 images", out)
    rc, out, err = cli(
        capsys, "search", "--index", index, collection["warped"], "-k", "3", "--rerank",
        "verify", "--json", "--verify-budget", "2",
    )  # fmt: skip
    assert rc == 0, err
    (line,) = json_lines(out)
    results = line["results"]
    assert Path(results[0]["path"]).name == "astronaut.png" and results[0]["inliers"] >= 30
    assert "inliers" in results[1] and "inliers" not in results[2]  # budget 2
    rc, out, err = cli(
        capsys, "search", "--index", index, collection["warped"], "--rerank", "verify"
    )
    assert rc == 0 and "inliers" in out
    rc, out, err = cli(capsys, "remove", "--index", index, photos / "rocket.png")
    assert rc == 0, err
    with LocalFeatureStore(index, "sift", create=False) as local:
        assert len(local) == len(NAMES) - 1


def test_cli_local_option_errors(collection, tmp_path, capsys):
    photos = collection["base"] / "photos"
    rc, _, err = cli(capsys, "index", photos, "--index", tmp_path / "i", "--local-side", "300")
    assert rc == 2 and one_line_error(err) and "--local-side need --local" in err
    rc, _, err = cli(
        capsys, "search", "--index", collection["index"], collection["warped"], "--rerank",
        "verify", "--local", "orb",
    )  # fmt: skip
    assert rc == 2 and one_line_error(err) and "stores sift local features" in err
    rc, _, err = cli(
        capsys, "search", "--index", collection["index"], collection["warped"], "--rerank",
        "verify,nope",
    )  # fmt: skip
    assert rc == 2 and "nope" in err and "aqe" in err
    rc, _, err = cli(capsys, "search", "--index", collection["index"], collection["warped"],
                     "--fusion", "inliers", "--rerank", "none")  # fmt: skip
    assert rc == 2 and "--fusion apply to verification: add --rerank verify" in err


def test_cli_match_draws_the_inliers(collection, tmp_path, capsys):
    out_png = tmp_path / "m" / "pair.png"
    a, b = collection["photos"][0], collection["warped"]
    rc, out, err = cli(capsys, "match", a, b, "--local", "sift", "--out", out_png, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["inliers"] >= 30 and result["tentative"] >= result["inliers"]
    h = np.array(result["model"])
    h /= h[2, 2]
    corners = np.array([[[0, 0], [319, 0], [319, 319], [0, 319]]], np.float64)
    err_px = np.abs(
        cv2.perspectiveTransform(corners, h) - cv2.perspectiveTransform(corners, H_TRUE)
    )
    assert err_px.max() < 4.0  # the known warp is recovered
    png = cv2.imread(str(out_png))
    assert png is not None and png.shape[1] > 2 * 300
    rc, out, err = cli(capsys, "match", a, collection["photos"][3], "--local", "sift")
    assert rc == 0, err
    inliers = int(summary(out)["inliers"].split()[0])
    assert inliers < 15  # astronaut vs rocket


def test_cli_match_errors(collection, tmp_path, capsys):
    rc, _, err = cli(
        capsys, "match", collection["photos"][0], tmp_path / "none.jpg", "--local", "sift"
    )
    assert rc == 3 and one_line_error(err) and "does not exist" in err
    rc, _, err = cli(
        capsys, "match", collection["photos"][0], collection["warped"], "--local-weights",
        tmp_path / "missing.pth",
    )  # fmt: skip
    assert rc == 2 and "no such file" in err


# -- real data (slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_real_oxford_query_verifies_its_landmark_not_another():
    """The first cropped Oxford query (all_souls_1) against its positives and images of
    another landmark, with the default preset (ALIKED @512 px): most positives are verified
    with many inliers (some show the building from far or in part), none of the others."""
    from lookalike.evaluate import load_dataset

    root = WEIGHTS.parents[1] / "oxford5k"
    if not (root.is_dir() and WEIGHTS.is_file()):
        pytest.skip(f"Oxford5k or the ALIKED weights are missing under {WEIGHTS.parents[1]}")
    ds = load_dataset("oxford5k", root)
    query = ds.queries[0]
    other = next(q for q in ds.queries if q.name.split("_")[0] != query.name.split("_")[0])
    conf = VerifyConf(weights=str(WEIGHTS))
    from lookalike.images import load_image
    from lookalike.local.matching import verify_pair

    extractor = conf.create_extractor()
    features = IndexFeatures(None, conf, extractor)  # type: ignore[arg-type]
    q = features.of_query(Query(image=query.image, box=query.box))

    def inliers(index: int) -> int:
        feats = extractor(np.asarray(load_image(ds.images[index])))
        return verify_pair(q, feats, ratio=conf.ratio, threshold_px=conf.threshold_px).inliers

    positives = [inliers(i) for i in query.positives[:6]]
    others = [inliers(i) for i in other.positives[:4]]
    assert sum(n >= 30 for n in positives) >= 4, positives
    assert max(others) < 15, others


def test_resolve_conf_applies_explicit_settings_and_presets_only_where_needed():
    from lookalike.index.manifest import Manifest, ModelIdentity
    from lookalike.local.conf import default_local_features
    from lookalike.rerank.verify import resolve_conf

    kept = Manifest({"model": "m"}, 8, ModelIdentity("m"), local=VerifyConf(features="orb"))
    assert resolve_conf(kept, {"features": "orb", "ratio": 0.7}).ratio == 0.7
    assert resolve_conf(kept, {"features": "orb"}) == VerifyConf(features="orb")
    with pytest.raises(ConfigError, match="64 keypoints"):
        resolve_conf(kept, {"features": "orb", "max_keypoints": 64})
    with pytest.raises(ConfigError, match="stores orb"):
        resolve_conf(kept, {"features": "sift"})
    bare = Manifest({"model": "m"}, 8, ModelIdentity("m"))
    got = resolve_conf(bare, {"features": "rootsift", "budget": 7})
    assert got == VERIFY_PRESETS["rootsift"].replace(budget=7)
    assert resolve_conf(bare, None) == default_local_features()  # aliked if on disk
