"""Geometric verification as a search stage: ``index --local``, ``--rerank verify``,
recognition with inliers, ``match``. SIFT (no weights to load) unless a test says otherwise.

The collection: five unrelated photos at 320 px, plus queries that are known homography
warps of one of them. The ``fast`` descriptor preset keeps indexing quick; what is tested
is the verification stage, not the global descriptor.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import photo
from test_cli import cli, json_lines, one_line_error, summary

from lookalike.errors import ConfigError, IndexStateError
from lookalike.extract import get_preset
from lookalike.index import IndexStore
from lookalike.indexing import index_folder
from lookalike.local import LocalFeatureStore, fuse_scores
from lookalike.local.conf import VERIFY_PRESETS, VerifyConf, get_verify_preset, local_preset
from lookalike.local.sync import record_conf, recorded_conf, stale_ids, sync_local
from lookalike.recognize import Recognizer
from lookalike.rerank.verify import NOT_VERIFIED, GeometricVerifier, check_stage_names
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


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Photos indexed with SIFT local features (read-only for the tests), and queries."""
    base = tmp_path_factory.mktemp("verify")
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


def _flat(path: Path) -> Path:
    cv2.imwrite(str(path), np.full((200, 240, 3), 127, np.uint8))  # no texture: no keypoints
    return path


def _copy_index(collection: dict, tmp_path: Path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(collection["index"], target)
    return target


# -- settings -----------------------------------------------------------------------------


def test_presets_are_valid_and_named():
    assert set(VERIFY_PRESETS) >= {"default", "seeds", "rootsift"}
    assert VERIFY_PRESETS["seeds"].fusion == "sim_sqrt_inliers"
    assert get_verify_preset("default") == VerifyConf()
    assert local_preset("rootsift") is VERIFY_PRESETS["rootsift"]
    assert local_preset("orb") == VerifyConf(features="orb")
    with pytest.raises(ConfigError, match="default, seeds, rootsift"):
        get_verify_preset("nope")


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


def test_stage_names_split_and_verify_only_once():
    assert check_stage_names(["dba", "verify", "aqe"]) == (["dba", "aqe"], True)
    assert check_stage_names(["aqe"]) == (["aqe"], False)
    with pytest.raises(ConfigError, match="twice"):
        check_stage_names(["verify", "verify"])


# -- the stage's re-ordering against a plain reference --------------------------------------


class FixedVerifier(GeometricVerifier):
    """The stage with given inlier counts instead of images."""

    def __init__(self, counts: dict[int, int], conf: VerifyConf) -> None:
        super().__init__(store=None, conf=conf)  # type: ignore[arg-type]
        self.counts = counts
        self.asked: list[int] = []

    def inliers(self, query, ids):
        self.asked = list(ids)
        return np.array([self.counts.get(i, 0) for i in ids], np.int64)


@pytest.mark.parametrize("fusion", ["inliers", "sim_sqrt_inliers", "sim_plus_inliers"])
def test_reranks_the_budget_by_fused_score_and_keeps_the_rest(fusion):
    rng = np.random.default_rng(3)
    scores = np.sort(rng.uniform(0.2, 0.9, 12).astype(np.float32))[::-1]
    ids = np.arange(100, 112, dtype=np.int64)
    ids[-2:] = -1  # padding
    scores[-2:] = -np.inf
    counts = {int(i): int(rng.integers(0, 60)) for i in ids[:10]}
    stage = FixedVerifier(counts, VerifyConf(features="sift", budget=6, fusion=fusion))
    out_s, out_i, out_n = stage({}, scores, ids, k=14)
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


def test_k_cuts_and_all_padding_verifies_nothing():
    stage = FixedVerifier({1: 50}, VerifyConf(features="sift"))
    _, i, n = stage({}, np.array([0.5, 0.4], np.float32), np.array([0, 1]), k=1)
    assert i.tolist() == [1] and n.tolist() == [50]
    stage.asked = []
    _, i, n = stage({}, np.full(3, -np.inf, np.float32), np.full(3, -1), k=2)
    assert i.tolist() == [-1, -1] and n.tolist() == [NOT_VERIFIED] * 2 and stage.asked == []


# -- index --local and the stored features --------------------------------------------------


def test_index_records_the_settings_and_stores_tagged_features(collection):
    with IndexStore.open(collection["index"]) as store:
        assert recorded_conf(store) == SIFT
        hashes = {r.id: r.content_hash for r in store.records("ok")}
        with LocalFeatureStore(store.path, "sift", create=False) as local:
            assert local.tags() == hashes
            assert local.max_keypoints == 512
            assert stale_ids(store, local) == ([], [])


def test_local_features_follow_updates_and_removals(collection, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(collection["base"] / "photos", photos)
    index = tmp_path / "index"
    index_folder(photos, index, CONF, local=SIFT)
    # a later run without --local keeps them current: one changed file, one removed
    photo("coffee", 320).rotate(90, expand=True).save(photos / "chelsea.png")
    (photos / "rocket.png").unlink()
    report = index_folder(photos, index, CONF, remove_missing=True)
    assert report.updated == 1 and report.removed == 1 and report.local_described == 1
    with IndexStore.open(index) as store:
        live = {r.id: r.content_hash for r in store.records("ok")}
        with LocalFeatureStore(index, "sift", create=False) as local:
            assert local.tags() == live  # removed image gone, updated one re-described
            chelsea = store.find_path(str((photos / "chelsea.png").resolve()))
            feats = local.get(chelsea.id)
            assert feats["image_size"] == (213, 320)  # the rotated file, portrait now


def test_an_interrupted_run_is_completed_by_the_next(collection, tmp_path):
    index = _copy_index(collection, tmp_path)
    with IndexStore.open(index, writable=True) as store:
        ids = [r.id for r in store.records("ok")]
        with LocalFeatureStore(index, "sift", create=False) as local:
            local.remove(ids[:2])  # as if killed before these features were committed
        assert sync_local(store) == 2
        with LocalFeatureStore(index, "sift", create=False) as local:
            assert sorted(local.tags()) == sorted(ids)


def test_other_local_features_on_the_same_index_are_refused(collection, tmp_path):
    index = _copy_index(collection, tmp_path)
    with pytest.raises(ConfigError, match=r"max_keypoints=512.*max_keypoints=256"):
        index_folder(
            collection["base"] / "photos", index, CONF, local=SIFT.replace(max_keypoints=256)
        )
    searcher = Searcher(index, verify={"features": "orb"})
    with searcher, pytest.raises(ConfigError, match="stores sift local features"):
        searcher.search_files([collection["warped"]], 3, rerank=["verify"])


# -- search with verification -----------------------------------------------------------------


def test_verify_puts_the_warped_photo_first_with_many_inliers(collection):
    with Searcher(collection["index"]) as searcher:
        scores, ids, inliers = searcher.search_files_verified(
            [collection["warped"]], k=5, rerank=["verify"]
        )
        hits = searcher.results(scores, ids)[0]
        timings = dict(searcher.verifier.timings)
    assert Path(hits[0].path).name == "astronaut.png"
    assert inliers[0, 0] >= 30  # the true homography explains many matches
    assert (inliers[0, 1:] < 15).all()  # unrelated photos: chance level
    assert scores[0, 0] > 1.0  # similarity + a full verification bonus
    assert timings["features"] == 0.0  # all candidate features came from the store
    assert set(timings) == {"features", "load", "match", "ransac"}


def test_verify_composes_with_descriptor_stages(collection):
    with Searcher(collection["index"]) as searcher:
        s, i, n = searcher.search_files_verified(
            [collection["warped"]], k=3, rerank=["alpha-qe", "verify"]
        )
        # reference: the verify stage applied by hand to the alpha-qe ranking of all images
        qe_s, qe_i = searcher.search_files([collection["warped"]], k=0, rerank=["alpha-qe"])
        query = searcher.verifier.query_features(collection["warped"])
        ref_s, ref_i, ref_n = searcher.verifier(query, qe_s[0], qe_i[0], 3)
        top = Path(searcher.results(s, i)[0][0].path).name
    assert top == "astronaut.png"
    assert i[0].tolist() == ref_i.tolist() and n[0].tolist() == ref_n.tolist()
    np.testing.assert_allclose(s[0], ref_s, rtol=1e-6)
    assert (n >= 0).all()  # budget 100 > k: every result returned was verified


def test_k_all_and_a_small_budget_put_verified_results_first(collection):
    with Searcher(collection["index"], verify={"budget": 2}) as searcher:
        plain_s, plain_i = searcher.search_files([collection["warped"]], k=0)
        s, i, n = searcher.search_files_verified([collection["warped"]], k=0, rerank=["verify"])
    assert i.shape == (1, len(NAMES)) and sorted(i[0].tolist()) == sorted(plain_i[0].tolist())
    assert (n[0, :2] >= 0).all() and (n[0, 2:] == NOT_VERIFIED).all()
    assert set(i[0, :2].tolist()) == set(plain_i[0, :2].tolist())  # the budget: top 2
    assert i[0, 2:].tolist() == plain_i[0, 2:].tolist()  # the rest keep their order
    np.testing.assert_allclose(s[0, 2:], plain_s[0, 2:], rtol=1e-6)
    assert (np.diff(s[0]) <= 1e-6).all()  # sim_plus_inliers keeps scores descending


def test_query_without_local_features_keeps_the_global_order(collection):
    with Searcher(collection["index"]) as searcher:
        feats = searcher.verifier.query_features(collection["flat"])
        assert len(feats["keypoints"]) == 0
        plain_s, plain_i = searcher.search_files([collection["flat"]], k=5)
        s, i, n = searcher.search_files_verified([collection["flat"]], k=5, rerank=["verify"])
    assert i.tolist() == plain_i.tolist()
    np.testing.assert_allclose(s, plain_s, rtol=1e-6)  # sim + 0 bonus
    assert n.tolist() == [[0] * 5]


def test_search_by_id_verifies_with_the_stored_features(collection):
    with Searcher(collection["index"]) as searcher:
        _, i, n = searcher.search_ids_verified([2], k=2, rerank=["verify"])
    assert i[0, 0] == 2 and n[0, 0] > 200  # itself: every match an inlier
    assert n[0, 1] < 15


def test_cropped_query_is_detected_at_its_whole_image_scale(collection, tmp_path):
    big = tmp_path / "big.png"
    photo("astronaut", 640).save(big)  # twice the indexed size; the crop is its top-left
    with Searcher(collection["index"]) as searcher:
        feats = searcher.verifier.query_features(big, box=(0, 0, 320, 320))
        s, i, n = searcher.search_files_verified([big], 1, [(0, 0, 320, 320)], rerank=["verify"])
        top = Path(searcher.results(s, i)[0][0].path).name
    assert feats["image_size"] == (320, 320)  # keypoints in pixels of the crop
    assert feats["keypoints"].max() < 320
    assert top == "astronaut.png" and n[0, 0] >= 20


def test_empty_and_one_image_indexes(tmp_path):
    one = tmp_path / "one"
    write_photos(one, names=("coffee",))
    index_folder(one, tmp_path / "idx1", CONF, local=SIFT)
    with Searcher(tmp_path / "idx1") as searcher:
        _, i, n = searcher.search_files_verified([one / "coffee.png"], 3, rerank=["verify"])
        (only,) = [r.id for r in searcher.store.records("ok")]
    assert i.tolist() == [[only, -1, -1]] and n[0, 0] > 100 and n[0, 1:].tolist() == [-1, -1]
    with IndexStore.open(tmp_path / "idx1", writable=True) as store:
        store.remove([only])
        sync_local(store)
        with LocalFeatureStore(store.path, "sift", create=False) as local:
            assert len(local) == 0
    with Searcher(tmp_path / "idx1") as searcher:
        _, i, n = searcher.search_files_verified([one / "coffee.png"], 3, rerank=["verify"])
    assert i.tolist() == [[-1, -1, -1]] and n.tolist() == [[-1, -1, -1]]


def test_index_without_local_features_computes_and_caches_them(collection, tmp_path):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)
    with Searcher(index, verify=SIFT) as searcher:
        searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        first = searcher.verifier.timings["features"]
    assert first > 0 and (index / "local" / "local.sqlite").exists()
    with Searcher(index, verify=SIFT) as searcher:
        s, i, _ = searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        assert searcher.verifier.timings["features"] == 0.0  # all cached now
        assert Path(searcher.results(s, i)[0][0].path).name == "astronaut.png"
    # removing an image forgets its lazily cached features too
    with IndexStore.open(index, writable=True) as store:
        store.remove([int(i[0, 0])])
        sync_local(store, compute=False)
        with LocalFeatureStore(index, "sift", create=False) as local:
            assert int(i[0, 0]) not in local and len(local) == len(NAMES) - 1


def test_unwritable_index_keeps_computed_features_in_memory(collection, tmp_path, monkeypatch):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(index / "local"))

    monkeypatch.setattr("lookalike.rerank.verify.open_local_store", refuse)
    with Searcher(index, verify=SIFT) as searcher:
        first = searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        assert searcher.verifier.timings["features"] > 0
        again = searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        assert searcher.verifier.timings["features"] == 0.0  # from memory
    assert not (index / "local").exists()
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_store_that_refuses_writes_falls_back_to_memory(collection, tmp_path, monkeypatch):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)
    with Searcher(index, verify=SIFT.replace(budget=2)) as searcher:  # creates local/, caches 2
        searcher.search_files_verified([collection["warped"]], 2, rerank=["verify"])

    def readonly(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(LocalFeatureStore, "put_many", readonly)
    with Searcher(index, verify=SIFT) as searcher:
        s, i, _ = searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        assert searcher.verifier.timings["features"] > 0  # 3 computed, kept in memory
        again = searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        assert searcher.verifier.timings["features"] == 0.0
        assert Path(searcher.results(s, i)[0][0].path).name == "astronaut.png"
    np.testing.assert_array_equal(again[1], i)


def test_aliked_verification_when_the_weights_are_on_disk(tmp_path):
    if not WEIGHTS.is_file():
        pytest.skip(f"ALIKED weights {WEIGHTS} are missing")
    photos = write_photos(tmp_path / "photos", names=("astronaut", "coffee", "rocket"))
    conf = VerifyConf(weights=str(WEIGHTS), max_keypoints=256, max_side=320)
    index_folder(tmp_path / "photos", tmp_path / "idx", CONF, local=conf)
    query = warp(photos[0], tmp_path / "q.png")
    with Searcher(tmp_path / "idx") as searcher:  # weights path recorded in the index
        s, i, n = searcher.search_files_verified([query], 3, rerank=["verify"])
        top = Path(searcher.results(s, i)[0][0].path).name
    assert top == "astronaut.png"
    assert n[0, 0] >= 30 and (n[0, 1:] < 15).all()


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
    with Searcher(tmp_path / "idx") as searcher:
        with pytest.raises(ConfigError, match="needs geometric verification"):
            Recognizer(searcher, k=3, confidence="inliers")
        rec = Recognizer(searcher, k=3, confidence="inliers", rerank=["verify"])
        right, wrong = rec.predict_files([known, stranger])
    assert right.label == "coffee" and right.confidence >= 30
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
                     "--fusion", "inliers")  # fmt: skip
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


def test_store_is_left_consistent_when_a_candidate_file_is_gone(collection, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(collection["base"] / "photos", photos)
    index_folder(photos, tmp_path / "idx", CONF)
    (photos / "coffee.png").unlink()  # indexed, then deleted before any verification
    with Searcher(tmp_path / "idx", verify=SIFT) as searcher:
        s, i, n = searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        paths = [Path(h.path).name for h in searcher.results(s, i)[0]]
    assert paths[0] == "astronaut.png"
    assert n[0, paths.index("coffee.png")] == 0  # unreadable: no features, no inliers
    with IndexStore.open(tmp_path / "idx") as store:
        coffee = store.find_path(str((photos / "coffee.png").resolve())).id
        live = {r.id: r.content_hash for r in store.records("ok")}
    with LocalFeatureStore(tmp_path / "idx", "sift", create=False) as local:
        tags = local.tags()
    assert coffee not in tags  # not stored: the next indexing run settles the file
    assert tags == {i: h for i, h in live.items() if i != coffee}
    with pytest.raises(IndexStateError):
        LocalFeatureStore(tmp_path / "idx", "orb", create=False)  # the store holds sift


def test_changed_file_features_are_not_stored_under_the_old_hash(collection, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(collection["base"] / "photos", photos)
    index_folder(photos, tmp_path / "idx", CONF)
    photo("chelsea", 320).save(photos / "coffee.png")  # changed after indexing
    with Searcher(tmp_path / "idx", verify=SIFT) as searcher:
        searcher.search_files_verified([collection["warped"]], 5, rerank=["verify"])
        coffee = searcher.store.find_path(str((photos / "coffee.png").resolve())).id
    with LocalFeatureStore(tmp_path / "idx", "sift", create=False) as local:
        assert coffee not in local and len(local) == len(NAMES) - 1
    report = index_folder(photos, tmp_path / "idx", CONF, local=SIFT)  # the next run settles it
    assert report.updated == 1 and report.local_described == 1
    with LocalFeatureStore(tmp_path / "idx", "sift", create=False) as local:
        assert coffee in local


def test_new_settings_after_deleting_the_local_features(collection, tmp_path):
    index = _copy_index(collection, tmp_path)
    photos = collection["base"] / "photos"
    orb = VerifyConf(features="orb", max_side=320)
    with pytest.raises(ConfigError, match=r"delete .*local"):
        index_folder(photos, index, CONF, local=orb)
    shutil.rmtree(index / "local")  # what the message says
    report = index_folder(photos, index, CONF, local=orb)
    assert report.local_described == len(NAMES)
    with IndexStore.open(index) as store:
        assert recorded_conf(store) == orb


def test_local_features_cached_by_searches_give_way_to_index_local(collection, tmp_path):
    index = tmp_path / "plain"
    index_folder(collection["base"] / "photos", index, CONF)
    orb = {"features": "orb", "max_side": 320, "budget": 2}
    with Searcher(index, verify=orb) as searcher:
        searcher.search_files_verified([collection["warped"]], 2, rerank=["verify"])
    with LocalFeatureStore(index, "orb", create=False) as local:
        assert len(local) == 2  # only the candidates verified
    report = index_folder(collection["base"] / "photos", index, CONF, local=SIFT)
    assert report.local_described == len(NAMES)
    with LocalFeatureStore(index, "sift", create=False) as local:
        assert len(local) == len(NAMES)


def test_recorded_weights_are_kept_when_none_are_given(tmp_path):
    write_photos(tmp_path / "p", names=("coffee",))
    index_folder(tmp_path / "p", tmp_path / "idx", CONF)
    with IndexStore.open(tmp_path / "idx", writable=True) as store:
        record_conf(store, VerifyConf(weights="/models/aliked-n16.pth"))
        record_conf(store, VerifyConf(budget=50))
        assert recorded_conf(store) == VerifyConf(weights="/models/aliked-n16.pth", budget=50)


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
    verifier = GeometricVerifier(store=None, conf=conf, extractor=extractor)  # type: ignore[arg-type]
    q = verifier.query_features(query.image, query.box)

    def inliers(index: int) -> int:
        feats = extractor(np.asarray(load_image(ds.images[index])))
        return verify_pair(q, feats, ratio=conf.ratio, threshold_px=conf.threshold_px).inliers

    positives = [inliers(i) for i in query.positives[:6]]
    others = [inliers(i) for i in other.positives[:4]]
    assert sum(n >= 30 for n in positives) >= 4, positives
    assert max(others) < 15, others
