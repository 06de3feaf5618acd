"""IndexStore on real SQLite, vector and faiss files: the API, settings, whitening, edge cases.

Search results are checked against a brute-force numpy inner product (``Flat`` backend);
the other backends are exercised in ``test_index_backend.py``, crash safety and locking in
``test_index_durability.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from index_helpers import DESCRIPTOR, D, brute_force, images, run_python, unit

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexConf, IndexStore, NewImage


def test_create_writes_a_self_describing_manifest(root: Path) -> None:
    conf = IndexConf(factory="HNSW32", ef_search=64)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
        assert store.writable and store.dim == D and len(store) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "lookalike-index" and manifest["format_version"] == 1
    assert manifest["descriptor"] == {**DESCRIPTOR, "scales": [1.0, 0.707]}
    assert manifest["dim"] == D
    assert manifest["index"] == {"factory": "HNSW32", "nprobe": 16, "ef_search": 64}
    assert manifest["whitening"]["learned"] is False and manifest["whitening"]["dim_out"] is None
    assert set(manifest["versions"]) == {"lookalike", "faiss", "numpy", "python"}
    assert manifest["created"].endswith("+00:00") and manifest["checkpoint"]["file"] is None
    with IndexStore.open(root) as reader:
        assert not reader.writable and reader.conf == conf
        assert reader.manifest["descriptor"] == manifest["descriptor"]


def test_add_then_search_matches_brute_force(root: Path) -> None:
    x = unit(300)
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        ids = store.add(images(300), x)
        assert ids == sorted(ids) and len(set(ids)) == 300
        scores, found = store.search(x, 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (300, 10)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    ref_scores, ref_ids = brute_force(x, np.array(ids), x, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.mean(found == ref_ids) > 0.99


def test_ids_records_and_metadata_round_trip(root: Path) -> None:
    x = unit(3)
    new = [
        NewImage("/a.jpg", "h1", 10, 1.5, 640, 480, {"label": "cat", "tags": ["x"]}),
        NewImage("/b.jpg", "h2", 20, 2.5, 320, 240),
        NewImage("/c.jpg", None, None, None, None, None, {"ünï": "cödé"}),
    ]
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        ids = store.add(new, x)
        store.set_metadata(ids[1], {"label": "dog"})
        with pytest.raises(ValueError, match="no image with id"):
            store.set_metadata(999, {})
        with pytest.raises(ValueError, match="JSON"):
            store.set_metadata(ids[0], {"bad": object()})
    with IndexStore.open(root) as store:
        a, b, missing, c = store.get([ids[0], ids[1], 999, ids[2]])
        assert missing is None
        assert (a.id, a.path, a.content_hash, a.size, a.mtime, a.width, a.height) == (
            ids[0], "/a.jpg", "h1", 10, 1.5, 640, 480,
        )  # fmt: skip
        assert a.metadata == {"label": "cat", "tags": ["x"]} and a.status == "ok"
        assert b.metadata == {"label": "dog"} and c.metadata == {"ünï": "cödé"}
        assert store.find_path("/b.jpg") == b and store.find_path("/nope") is None
        assert [r.id for r in store.records()] == ids
        np.testing.assert_array_equal(store.vectors([ids[2], ids[0]]), x[[2, 0]])
        np.testing.assert_array_equal(store.search(x, 1)[1][:, 0], ids)


def test_records_pages_and_filters(root: Path) -> None:
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        store.add([*images(1500), NewImage("/bad.jpg", error="truncated")], unit(1500))
        assert len(list(store.records())) == 1501
        assert [r.path for r in store.records("error")] == ["/bad.jpg"]
        assert sum(1 for _ in store.records("ok")) == 1500
        with pytest.raises(ValueError, match="status"):
            list(store.records("broken"))


def test_error_images_are_stored_not_searchable(root: Path) -> None:
    x = unit(4)
    batch = [*images(3), NewImage("/broken.jpg", size=5, error="cannot identify image file")]
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        ids = store.add(batch, x[:3])
        assert store.count() == {"ok": 3, "error": 1} and len(store) == 3
        broken = store.get([ids[3]])[0]
        assert broken.status == "error" and broken.error == "cannot identify image file"
        _, found = store.search(x, 0)
        assert found.shape == (4, 3) and ids[3] not in found
        with pytest.raises(ValueError, match="no vector"):
            store.vectors([ids[3]])
        # an ok image that now fails to decode loses its vector, keeps its id
        gone = NewImage("/img/0.jpg", error="gone bad")
        assert store.add([gone], np.empty((0, D), np.float32)) == [ids[0]]
        assert store.count() == {"ok": 2, "error": 2}
        assert ids[0] not in store.search(x[:1], 0)[1]
        # and comes back when it decodes again
        assert store.add([NewImage("/img/0.jpg")], x[3:4]) == [ids[0]]
        assert store.search(x[3:4], 1)[1][0, 0] == ids[0]
        assert store.get([ids[0]])[0].error is None


def test_update_keeps_id_and_replaces_vector(root: Path) -> None:
    x, y = unit(50), unit(1, seed=5)
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        ids = store.add(images(50, metadata={"v": 1}), x)
        assert store.add([NewImage("/img/7.jpg", "new-hash", metadata={"v": 2})], y) == [ids[7]]
        assert len(store) == 50
        scores, found = store.search(y, 1)
        assert found[0, 0] == ids[7] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        old_scores, old_found = store.search(x[7:8], 50)
        assert ids[7] not in old_found[0, :1] and old_scores[0, 0] < 0.999
        record = store.get([ids[7]])[0]
        assert record.content_hash == "new-hash" and record.metadata == {"v": 2}
        np.testing.assert_array_equal(store.vectors([ids[7]]), y)
    with IndexStore.open(root) as reader:  # replayed from the ops log
        assert reader.search(y, 1)[1][0, 0] == ids[7]


def test_remove_by_id_and_path(root: Path) -> None:
    x = unit(20)
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        ids = store.add([*images(20), NewImage("/e.jpg", error="bad")], x)
        assert store.remove([ids[0], ids[1], 12345]) == 2
        assert store.remove([ids[0]]) == 0 and store.remove([]) == 0
        assert store.remove_paths(["/img/2.jpg", "/e.jpg", "/unknown.jpg"]) == 2
        assert store.count() == {"ok": 17, "error": 0} and len(store) == 17
        _, found = store.search(x[:3], 0)
        assert found.shape == (3, 17) and not np.isin(found, ids[:3]).any()
        assert store.get(ids[:3]) == [None, None, None]
        assert store.find_path("/img/2.jpg") is None
        # a removed path added again is a new image with a new id
        assert store.add([NewImage("/img/0.jpg")], x[:1])[0] > max(ids)


# -- compatibility and wrong directories -------------------------------------------------


def test_reopening_with_other_settings_names_every_difference(root: Path) -> None:
    IndexStore.create(root, DESCRIPTOR, D).close()
    other = {**DESCRIPTOR, "model": "efficientnet_lite2", "pooling": "mac"}
    with pytest.raises(IndexStateError) as info:
        IndexStore.create(root, other, D, exist_ok=True)
    message = str(info.value)
    assert "model=efficientnet_lite0, pooling=gem" in message
    assert "model=efficientnet_lite2, pooling=mac" in message
    assert "scales" not in message and "new --index directory" in message
    with pytest.raises(IndexStateError, match=r"index\.factory=Flat.*index\.factory=HNSW32"):
        IndexStore.create(root, DESCRIPTOR, D, IndexConf(factory="HNSW32"), exist_ok=True)
    with pytest.raises(IndexStateError, match=r"dim=32.*dim=64"):
        IndexStore.create(root, DESCRIPTOR, 64, exist_ok=True)
    with IndexStore.open(root) as reader:
        reader.check_compatible(dict(DESCRIPTOR), IndexConf())  # tuple == stored list
        with pytest.raises(IndexStateError, match=r"extra=<unset>.*extra=1"):
            reader.check_compatible({**DESCRIPTOR, "extra": 1})
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(nprobe=4), exist_ok=True) as store:
        assert store.conf.nprobe == 4  # search knobs are not a compatibility matter
    with pytest.raises(IndexStateError, match="already holds a lookalike index"):
        IndexStore.create(root, DESCRIPTOR, D)


def test_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(IndexStateError, match="does not exist"):
        IndexStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexStateError, match=r"not a lookalike index \(no manifest.json\)"):
        IndexStore.open(tmp_path / "empty")
    assert not list((tmp_path / "empty").iterdir())  # opening created nothing
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(IndexStateError, match="not a lookalike index"):
        IndexStore.open(tmp_path / "photos", writable=True)
    with pytest.raises(IndexStateError, match="not empty and not a lookalike index"):
        IndexStore.create(tmp_path / "photos", DESCRIPTOR, D)
    (tmp_path / "file").write_text("x")
    for call in (IndexStore.open, lambda p: IndexStore.create(p, DESCRIPTOR, D)):
        with pytest.raises(IndexStateError, match="is a file"):
            call(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(IndexStateError, match="format 'something-else'"):
        IndexStore.open(tmp_path / "other")
    (tmp_path / "other" / "manifest.json").write_text("{not json")
    with pytest.raises(IndexStateError, match="not valid JSON"):
        IndexStore.open(tmp_path / "other")


def test_newer_format_is_refused(filled) -> None:
    root = filled[0]
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(IndexStateError, match=r"format version 2.*upgrade lookalike"):
        IndexStore.open(root)


def test_interrupted_create_can_be_redone(root: Path) -> None:
    root.mkdir()
    (root / "meta.sqlite").write_bytes(b"")  # died before the manifest was written
    (root / "lock").write_text("")
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        store.add(images(1), unit(1))
    with pytest.raises(ConfigError, match="could not parse"):
        IndexStore.create(root.parent / "bad", DESCRIPTOR, D, IndexConf(factory="IVFx"))
    with pytest.raises(ConfigError, match="positive"):
        IndexStore.create(root.parent / "bad", DESCRIPTOR, 0)


# -- whitening ---------------------------------------------------------------------------


def test_search_happens_in_the_whitened_space(filled) -> None:
    from lookalike.whitening import Whitening

    root, x, ids = filled
    rng = np.random.default_rng(11)
    whitening = Whitening(
        mean=(0.1 * rng.standard_normal(D)).astype(np.float32),
        projection=rng.standard_normal((D, 16)).astype(np.float32),
    )
    queries = unit(20, seed=12)
    with IndexStore.open(root, writable=True) as writer:
        writer.set_whitening(whitening)
        assert writer.manifest["whitening"]["learned"] is True
        assert writer.manifest["whitening"]["dim_out"] == 16
        scores, found = writer.search(queries, 5)
    ref_scores, ref_ids = brute_force(
        whitening.apply(x), np.array(ids), whitening.apply(queries), 5
    )
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    with IndexStore.open(root) as reader:  # persisted: whitening.npz + a 16-d checkpoint
        np.testing.assert_array_equal(reader.whitening.projection, whitening.projection)
        assert reader._view.backend.dim == 16
        np.testing.assert_array_equal(reader.search(queries, 5)[1], ref_ids)
        np.testing.assert_array_equal(reader.vectors(ids[:3]), x[:3])  # stored raw
    with IndexStore.open(root, writable=True) as writer:
        new = unit(2, seed=13)
        new_ids = writer.add(images(2, prefix="/w"), new)  # whitened on the way in
        np.testing.assert_array_equal(writer.search(new, 1)[1][:, 0], new_ids)
        writer.set_whitening(None)
        assert not (root / "whitening.npz").exists() and writer.whitening is None
        _, raw_ids = brute_force(np.vstack([x, new]), np.array(ids + new_ids), queries, 5)
        np.testing.assert_array_equal(writer.search(queries, 5)[1], raw_ids)
        with pytest.raises(ConfigError, match="takes 8-d descriptors"):
            writer.set_whitening(Whitening(np.zeros(8, np.float32), np.eye(8, dtype=np.float32)))


def test_reader_refresh_follows_a_whitening_change(filled) -> None:
    from lookalike.whitening import Whitening

    root, x, ids = filled
    whitening = Whitening(np.zeros(D, np.float32), np.eye(D, dtype=np.float32)[:, ::-1].copy())
    reader = IndexStore.open(root)
    with IndexStore.open(root, writable=True) as writer:
        writer.set_whitening(whitening)
    reader.refresh()
    assert reader.whitening is not None and reader.manifest["whitening"]["epoch"] == 1
    np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
    reader.close()


# -- edge cases --------------------------------------------------------------------------


def test_empty_index_search(root: Path) -> None:
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(factory="IVF16,Flat")) as store:
        scores, found = store.search(unit(3), 4)
        assert found.shape == (3, 4) and (found == -1).all() and np.isneginf(scores).all()
        scores, found = store.search(unit(3), 0)  # "all" of nothing
        assert found.shape == (3, 0) and scores.shape == (3, 0)
        store.checkpoint()
    with IndexStore.open(root) as reader:
        assert (reader.search(unit(1), 2)[1] == -1).all()


def test_k_larger_than_index_and_k_zero(root: Path) -> None:
    x = unit(5)
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        ids = store.add(images(5), x)
        scores, found = store.search(x[:2], 8)
        assert found.shape == (2, 8) and (found[:, 5:] == -1).all()
        assert np.isneginf(scores[:, 5:]).all() and np.isfinite(scores[:, :5]).all()
        assert set(found[0, :5].tolist()) == set(ids)
        scores, found = store.search(x[:2], 0)
        assert found.shape == (2, 5) and set(found[1].tolist()) == set(ids)
        assert store.search(np.empty((0, D), np.float32), 3)[1].shape == (0, 3)


def test_one_image_index(root: Path) -> None:
    x = unit(1)
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(factory="HNSW32")) as store:
        (only,) = store.add([NewImage("/one.jpg")], x)
        _, found = store.search(unit(3, seed=2), 2)
        assert (found[:, 0] == only).all() and (found[:, 1] == -1).all()
        assert store.add([], np.empty((0, D), np.float32)) == []


def test_wrong_shapes_and_dtypes(root: Path) -> None:
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        with pytest.raises(ValueError, match="float32"):
            store.add(images(2), unit(2).astype(np.float64))
        with pytest.raises(ValueError, match=r"shape \(2, 32\)"):
            store.add(images(2), unit(2, d=16))
        with pytest.raises(ValueError, match=r"shape \(2, 32\)"):
            store.add(images(2), unit(3))  # one vector per image without error
        with pytest.raises(ValueError, match="NaN"):
            store.add(images(1), np.full((1, D), np.nan, np.float32))
        with pytest.raises(ValueError, match="twice"):
            store.add([NewImage("/a"), NewImage("/a")], unit(2))
        with pytest.raises(ValueError, match=r"shape \(0, 32\)"):
            store.add([], unit(1))
        with pytest.raises(ValueError, match="numpy array"):
            store.add(images(1), [[0.0] * D])
        store.add(images(2), unit(2))
        with pytest.raises(ValueError, match="float32"):
            store.search(unit(1).astype(np.float16), 1)
        with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
            store.search(unit(1)[0], 1)
        with pytest.raises(ValueError, match="no vector"):
            store.vectors([1, 999])
        assert store.count() == {"ok": 2, "error": 0}  # failed batches left nothing behind
        assert (root / "vectors.f32").stat().st_size == 2 * D * 4


def test_search_params_can_change(filled) -> None:
    root = filled[0]
    with IndexStore.open(root, writable=True) as writer:
        writer.set_search_params(nprobe=3, ef_search=50)
    assert json.loads((root / "manifest.json").read_text())["index"]["nprobe"] == 3
    with IndexStore.open(root) as reader:
        assert reader.conf == IndexConf(nprobe=3, ef_search=50)


def test_importing_the_index_does_not_import_torch() -> None:
    child = run_python("import sys, lookalike.index; print('torch' in sys.modules)")
    out, err = child.communicate(timeout=60)
    assert out.strip() == "False", err
