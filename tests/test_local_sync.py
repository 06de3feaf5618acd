"""``lookalike index --local``: an index's local features follow its images.

The features are recorded with the index (:func:`lookalike.local.sync.record_conf`), kept in
step by every later indexing run or removal (:func:`~lookalike.local.sync.sync_local`),
tagged with the content hash of the image they describe, and never stored for a file that
changed since it was indexed. The collection is tests/test_verify.py's (SIFT at 320 px).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import photo
from test_verify import CONF, NAMES, SIFT, copy_index, make_collection, verified, write_photos

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexStore
from lookalike.indexing import index_folder
from lookalike.local import LocalFeatureStore
from lookalike.local.conf import VerifyConf
from lookalike.local.sync import record_conf, recorded_conf, stale_ids, sync_local
from lookalike.search import Searcher


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tests/test_verify.py's collection (read-only for the tests)."""
    return make_collection(tmp_path_factory.mktemp("sync"))


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
    index = copy_index(collection, tmp_path)
    with IndexStore.open(index, writable=True) as store:
        ids = [r.id for r in store.records("ok")]
        with LocalFeatureStore(index, "sift", create=False) as local:
            local.remove(ids[:2])  # as if killed before these features were committed
        assert sync_local(store) == 2
        with LocalFeatureStore(index, "sift", create=False) as local:
            assert sorted(local.tags()) == sorted(ids)


def test_other_local_features_on_the_same_index_are_refused(collection, tmp_path):
    index = copy_index(collection, tmp_path)
    with pytest.raises(ConfigError, match=r"max_keypoints=512.*max_keypoints=256"):
        index_folder(
            collection["base"] / "photos", index, CONF, local=SIFT.replace(max_keypoints=256)
        )
    with pytest.raises(ConfigError, match="stores sift local features"):
        Searcher.open(index, ["verify"], {"features": "orb"})
    with IndexStore.open(index) as store:
        assert recorded_conf(store) == SIFT  # nothing recorded by the refused run


def test_store_is_left_consistent_when_a_candidate_file_is_gone(collection, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(collection["base"] / "photos", photos)
    index_folder(photos, tmp_path / "idx", CONF)
    (photos / "coffee.png").unlink()  # indexed, then deleted before any verification
    got, hits, _ = verified(tmp_path / "idx", [collection["warped"]], 5, verify=SIFT)
    paths = [Path(h.path).name for h in hits[0]]
    assert paths[0] == "astronaut.png"
    assert got.inliers[0, paths.index("coffee.png")] == 0  # unreadable: no features, no inliers
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
    with Searcher.open(tmp_path / "idx", ["verify"], SIFT) as searcher:
        searcher.search([collection["warped"]], 5)
        coffee = searcher.store.find_path(str((photos / "coffee.png").resolve())).id
    with LocalFeatureStore(tmp_path / "idx", "sift", create=False) as local:
        assert coffee not in local and len(local) == len(NAMES) - 1
    report = index_folder(photos, tmp_path / "idx", CONF, local=SIFT)  # the next run settles it
    assert report.updated == 1 and report.local_described == 1
    with LocalFeatureStore(tmp_path / "idx", "sift", create=False) as local:
        assert coffee in local


def test_new_settings_after_deleting_the_local_features(collection, tmp_path):
    index = copy_index(collection, tmp_path)
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
    verified(index, [collection["warped"]], 2, verify=orb)
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
