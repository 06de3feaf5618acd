"""IndexStore on real SQLite, vector and backend files: the API, settings, whitening, the
vector source re-ranking reads, freshness, edge cases.

Search results are checked against a brute-force numpy inner product; the tests of the
image set run on an exact configuration of every registered backend (``BACKEND_CONFS``).
The backends themselves are exercised in ``test_index_backends.py``, crash safety and
locking in ``test_index_durability.py``, the manifest and format 1 in
``test_index_manifest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from index_helpers import (
    BACKEND_CONFS,
    DESCRIPTOR,
    D,
    brute_force,
    fill,
    images,
    run_python,
    unit,
)

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexConf, IndexStore, NewImage, VectorSource
from lookalike.index.backends import keeps_fields
from lookalike.index.manifest import DBASettings, QueryDefaults


def test_create_writes_a_self_describing_manifest(root: Path) -> None:
    conf = IndexConf(factory="HNSW32", ef_search=64)
    query = QueryDefaults((0, 90), 0.05)
    with IndexStore.create(root, DESCRIPTOR, D, conf, query=query, weights_hash="w1") as store:
        assert store.writable and store.dim == D and len(store) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "lookalike-index" and manifest["format_version"] == 2
    assert manifest["descriptor"] == {**DESCRIPTOR, "scales": [1.0, 0.707]}
    assert manifest["dim"] == D
    assert manifest["index"] == {"backend": "faiss", "factory": "HNSW32", "nprobe": 16,
                                 "ef_search": 64}  # fmt: skip
    assert manifest["model"] == {
        "name": "efficientnet_lite0",
        "weights": None,
        "weights_hash": "w1",
    }
    assert manifest["query"] == {
        "rotations": [0, 90],
        "rotation_penalty": 0.05,
        "crops": [],
        "crop_penalty": 0.05,
    }
    assert manifest["whitening"] == {"learned": False, "dim_out": None, "epoch": 0}
    assert manifest["local"] is None and manifest["dba"] is None
    assert set(manifest["versions"]) == {"lookalike", "faiss", "numpy", "python"}
    assert manifest["created"].endswith("+00:00") and manifest["checkpoint"]["file"] is None
    with IndexStore.open(root) as reader:
        assert not reader.writable and reader.conf == conf
        typed = reader.manifest
        assert typed.descriptor == manifest["descriptor"] and typed.format_version == 2
        assert typed.index == conf and typed.query == query and typed.dim == D
        assert typed.model.weights_hash == "w1" and typed.checkpoint.file is None
        assert "read-only" in repr(reader) and "'faiss'" in repr(reader)
        with pytest.raises(AttributeError):
            typed.dim = 3  # frozen


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_add_then_search_matches_brute_force(root: Path, conf: IndexConf) -> None:
    x = unit(300)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
        ids = store.add(images(300), x)
        assert ids == sorted(ids) and len(set(ids)) == 300
        scores, found = store.search(x, 10)
        assert store.stats()["backend"] == conf.backend and store.stats()["live"] == 300
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (300, 10)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    ref_scores, ref_ids = brute_force(x, np.array(ids), x, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.mean(found == ref_ids) > 0.99
    with IndexStore.open(root) as reader:  # reopened: replayed from the ops log
        np.testing.assert_array_equal(reader.search(x, 10)[1], found)


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_ids_records_and_metadata_round_trip(root: Path, conf: IndexConf) -> None:
    x = unit(3)
    new = [
        NewImage("/a.jpg", "h1", 10, 1.5, 640, 480, {"label": "cat", "tags": ["x"]}),
        NewImage("/b.jpg", "h2", 20, 2.5, 320, 240),
        NewImage("/c.jpg", None, None, None, None, None, {"ünï": "cödé"}),
    ]
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
        ids = store.add(new, x)
        store.set_metadata(ids[1], {"label": "dog"})
        with pytest.raises(ValueError, match="no image with id"):
            store.set_metadata(999, {})
        with pytest.raises(ValueError, match="JSON"):
            store.set_metadata(ids[0], {"bad": object()})
        store.checkpoint()
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
        relabel = 2 if keeps_fields(conf) else 0  # the new label reaches the backend
        assert store.manifest.checkpoint.file == f"{conf.backend}-{3 + relabel}.index"


def test_records_pages_and_filters(root: Path) -> None:
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        store.add([*images(1500), NewImage("/bad.jpg", error="truncated")], unit(1500))
        assert len(list(store.records())) == 1501
        assert [r.path for r in store.records("error")] == ["/bad.jpg"]
        assert sum(1 for _ in store.records("ok")) == 1500
        with pytest.raises(ValueError, match="status"):
            list(store.records("broken"))


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_error_images_are_stored_not_searchable(root: Path, conf: IndexConf) -> None:
    x = unit(4)
    batch = [*images(3), NewImage("/broken.jpg", size=5, error="cannot identify image file")]
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
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
        store.checkpoint()
        # and comes back when it decodes again: the same id added after being removed
        assert store.add([NewImage("/img/0.jpg")], x[3:4]) == [ids[0]]
        assert store.search(x[3:4], 1)[1][0, 0] == ids[0]
        assert store.get([ids[0]])[0].error is None
    with IndexStore.open(root) as reader:  # checkpoint + replay of the re-added id
        assert reader.search(x[3:4], 1)[1][0, 0] == ids[0] and len(reader) == 3
        assert reader.stats()["live"] == 3


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_update_keeps_id_and_replaces_vector(root: Path, conf: IndexConf) -> None:
    x, y = unit(50), unit(1, seed=5)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
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
        assert reader.stats()["live"] == 50


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_remove_by_id_and_path(root: Path, conf: IndexConf) -> None:
    x = unit(20)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
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
    with IndexStore.open(root) as reader:
        _, found = reader.search(x[:3], 0)
        assert found.shape == (3, 18) and not np.isin(found, ids[:3]).any()


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
    with pytest.raises(IndexStateError, match=r"index\.backend=faiss.*index\.backend=numpy"):
        IndexStore.create(root, DESCRIPTOR, D, IndexConf(backend="numpy"), exist_ok=True)
    with pytest.raises(IndexStateError, match=r"dim=32.*dim=64"):
        IndexStore.create(root, DESCRIPTOR, 64, exist_ok=True)
    with IndexStore.open(root) as reader:
        reader.check_compatible(dict(DESCRIPTOR), IndexConf())  # tuple == stored list
        with pytest.raises(IndexStateError, match=r"extra=<unset>.*extra=1"):
            reader.check_compatible({**DESCRIPTOR, "extra": 1})
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(nprobe=4), exist_ok=True) as store:
        assert store.conf.nprobe == 4  # search knobs are not a compatibility matter
    assert IndexStore.open(root).manifest.index.nprobe == 4
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
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]  # no lock file
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
    with pytest.raises(IndexStateError, match=r"unreadable \(JSONDecodeError.*damaged, rebuild"):
        IndexStore.open(tmp_path / "other")


def test_newer_format_is_refused(filled) -> None:
    root = filled[0]
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    for writable in (False, True):
        with pytest.raises(IndexStateError, match=r"format version 3.*upgrade lookalike"):
            IndexStore.open(root, writable=writable)


def test_interrupted_create_can_be_redone(root: Path) -> None:
    root.mkdir()
    (root / "meta.sqlite").write_bytes(b"")  # died before the manifest was written
    (root / "lock").write_text("")
    with IndexStore.create(root, DESCRIPTOR, D) as store:
        store.add(images(1), unit(1))
    with pytest.raises(ConfigError, match="could not parse"):
        IndexStore.create(root.parent / "bad", DESCRIPTOR, D, IndexConf(factory="IVFx"))
    with pytest.raises(ConfigError, match="numpy backend searches exactly"):
        IndexStore.create(root.parent / "bad", DESCRIPTOR, D, IndexConf("HNSW32", backend="numpy"))
    with pytest.raises(ConfigError, match="positive"):
        IndexStore.create(root.parent / "bad", DESCRIPTOR, 0)
    with pytest.raises(ConfigError, match="descriptor model must be a string"):
        IndexStore.create(root.parent / "bad", {"model": 5}, D)
    assert not (root.parent / "bad" / "manifest.json").exists()


# -- whitening ---------------------------------------------------------------------------


def random_whitening(dim_out: int = 16, seed: int = 11):
    from lookalike.whitening import Whitening

    rng = np.random.default_rng(seed)
    return Whitening(
        mean=(0.1 * rng.standard_normal(D)).astype(np.float32),
        projection=rng.standard_normal((D, dim_out)).astype(np.float32),
    )


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_search_happens_in_the_whitened_space(root: Path, conf: IndexConf) -> None:
    from lookalike.whitening import Whitening

    x, ids = fill(root, conf)
    whitening = random_whitening()
    queries = unit(20, seed=12)
    with IndexStore.open(root, writable=True) as writer:
        writer.set_whitening(whitening)
        assert writer.manifest.whitening.learned is True
        assert writer.manifest.whitening.dim_out == 16
        assert writer.manifest.checkpoint.file == f"{conf.backend}-200.index"
        scores, found = writer.search(queries, 5)
    ref_scores, ref_ids = brute_force(
        whitening.apply(x), np.array(ids), whitening.apply(queries), 5
    )
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    with IndexStore.open(root) as reader:  # persisted: whitening.npz + a 16-d checkpoint
        np.testing.assert_array_equal(reader.whitening.projection, whitening.projection)
        assert reader.vector_source().dim == 16
        np.testing.assert_array_equal(reader.search(queries, 5)[1], ref_ids)
        np.testing.assert_array_equal(reader.vectors(ids[:3]), x[:3])  # stored raw
    with IndexStore.open(root, writable=True) as writer:
        new = unit(2, seed=13)
        new_ids = writer.add(images(2, prefix="/w"), new)  # whitened on the way in
        np.testing.assert_array_equal(writer.search(new, 1)[1][:, 0], new_ids)
        writer.set_whitening(None)
        assert not (root / "whitening.npz").exists() and writer.whitening is None
        assert writer.manifest.whitening.learned is False
        assert writer.manifest.whitening.dim_out is None
        _, raw_ids = brute_force(np.vstack([x, new]), np.array(ids + new_ids), queries, 5)
        np.testing.assert_array_equal(writer.search(queries, 5)[1], raw_ids)
        with pytest.raises(ConfigError, match="takes 8-d descriptors"):
            writer.set_whitening(Whitening(np.zeros(8, np.float32), np.eye(8, dtype=np.float32)))
    with IndexStore.open(root) as reader:
        assert reader.whitening is None and reader.vector_source().dim == D
        np.testing.assert_array_equal(reader.search(queries, 5)[1], raw_ids)


def test_reader_refresh_follows_a_whitening_change(filled) -> None:
    from lookalike.whitening import Whitening

    root, x, ids = filled
    whitening = Whitening(np.zeros(D, np.float32), np.eye(D, dtype=np.float32)[:, ::-1].copy())
    reader = IndexStore.open(root)
    assert reader.vector_source().version() == (200, 0)
    with IndexStore.open(root, writable=True) as writer:
        writer.set_whitening(whitening)
        epoch = writer.manifest.whitening.epoch
    assert epoch > 0
    reader.refresh()
    assert reader.whitening is not None and reader.manifest.whitening.epoch == epoch
    assert reader.vector_source().version() == (200, epoch)
    np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
    reader.close()


def test_reader_loading_during_a_whitening_change_reloads(filled, monkeypatch) -> None:
    """A reader that loads between the manifest and the whitening file being written ends
    up with the new whitening after a refresh, never the old one under the new epoch."""
    import lookalike.index.writer as writer_module

    root, x, _ = filled
    whitening = random_whitening(dim_out=D, seed=3)
    readers: list[IndexStore] = []
    original = writer_module.save_whitening

    def write_then_open(path: Path, whitening) -> str:
        readers.append(IndexStore.open(root))  # sees the new manifest, the old file
        return original(path, whitening)

    monkeypatch.setattr(writer_module, "save_whitening", write_then_open)
    with IndexStore.open(root, writable=True) as writer:
        writer.set_whitening(whitening)
        version = writer.vector_source().version()
        expected = writer.search(x[:20], 3)[1]
    (reader,) = readers
    assert reader.whitening is None  # loaded mid-change: the old whitening ...
    assert reader.vector_source().version() != version  # ... under an epoch of its own
    reader.refresh()
    assert reader.whitening is not None and reader.vector_source().version() == version
    np.testing.assert_array_equal(reader.vector_source().to_index_space(x[:2]),
                                  whitening.apply(x[:2]))  # fmt: skip
    np.testing.assert_array_equal(reader.search(x[:20], 3)[1], expected)
    reader.close()


# -- the vector source re-ranking reads ----------------------------------------------------


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_vector_source_reads_the_index_space(root: Path, conf: IndexConf) -> None:
    x, ids = fill(root, conf, n=50)
    whitening = random_whitening()
    with IndexStore.open(root, writable=True) as store:
        source = store.vector_source()
        assert isinstance(source, VectorSource) and len(source) == 50 and source.dim == D
        assert source.version() == (50, 0)
        np.testing.assert_array_equal(source.to_index_space(x[:3]), x[:3])
        store.set_whitening(whitening)
        epoch = store.manifest.whitening.epoch
        assert source.dim == 16 and source.version() == (50, epoch)
        white = whitening.apply(x)
        np.testing.assert_allclose(source.to_index_space(x[:3]), white[:3], atol=1e-6)
        np.testing.assert_allclose(source.vectors([ids[4], ids[1]]), white[[4, 1]], atol=1e-6)
        with pytest.raises(ValueError, match="no vector"):
            source.vectors([999])
        scores, found = source.search(white[:5], 3)
        ref_scores, ref_ids = brute_force(white, np.array(ids), white[:5], 3)
        np.testing.assert_array_equal(found, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
        assert source.search(white[:2], 0)[1].shape == (2, 50)  # k <= 0: all
        with pytest.raises(ValueError, match=r"shape \(N, 16\)"):
            source.search(x[:2], 3)  # raw queries are not index-space ones
        store.remove(ids[:2])
        store.add([NewImage("/img/5.jpg")], unit(1, seed=9))  # an update: two ops
        assert source.version() == (54, epoch) and len(source) == 48
        live = source.live()
        assert (live.seq, live.epoch) == (54, epoch)
        np.testing.assert_array_equal(live.ids, ids[2:])
        assert live.seqs[live.ids.tolist().index(ids[5])] == 54
        assert set(live.seqs.tolist()) - {54} == set(range(3, 51)) - {6}
        np.testing.assert_allclose(live.vectors[0], white[2], atol=1e-6)
        assert live.vectors.shape == (48, 16) and live.vectors.dtype == np.float32


# -- freshness and short writes of readers ---------------------------------------------------


def test_refresh_if_changed_is_cheap_and_exact(filled) -> None:
    root = filled[0]
    reader = IndexStore.open(root)
    assert reader.refresh_if_changed() is False
    with IndexStore.open(root, writable=True) as writer:
        assert writer.refresh_if_changed() is False  # a writer is always current
        new_ids = writer.add(images(2, prefix="/n"), unit(2, seed=3))
        assert reader.refresh_if_changed() is True
        np.testing.assert_array_equal(reader.search(unit(2, seed=3), 1)[1][:, 0], new_ids)
        assert reader.refresh_if_changed() is False
        writer.set_search_params(nprobe=5)  # a manifest change alone
        assert reader.refresh_if_changed() is True
    reader.close()


def test_try_writer_lets_a_reader_record_settings(filled) -> None:
    root = filled[0]
    reader = IndexStore.open(root)
    with pytest.raises(IndexStateError, match="read-only"):
        reader.update_manifest(dba=DBASettings(3, 2.0))
    with IndexStore.open(root, writable=True), reader.try_writer() as ok:
        assert ok is False  # the writer holds the lock: no waiting
    with reader.try_writer() as ok:
        assert ok is True
        reader.update_manifest(dba=DBASettings(3, 2.0))
    assert reader.manifest.dba == DBASettings(3, 2.0) and not reader.writable
    with pytest.raises(IndexStateError, match="read-only"):
        reader.update_manifest(dba=None)
    with IndexStore.open(root, writable=True) as writer:  # the lock was released
        assert writer.manifest.dba == DBASettings(3, 2.0)
        with writer.try_writer() as ok:
            assert ok is True
    reader.close()


def test_try_writer_keeps_unseen_commits_visible(filled) -> None:
    root = filled[0]
    reader = IndexStore.open(root)
    with IndexStore.open(root, writable=True) as writer:
        new_ids = writer.add(images(3, prefix="/unseen"), unit(3, seed=6))
    with reader.try_writer() as ok:  # before the reader refreshed
        assert ok
        reader.update_manifest(dba=DBASettings())
    assert reader.refresh_if_changed() is True  # the writer's commit is still noticed
    np.testing.assert_array_equal(reader.search(unit(3, seed=6), 1)[1][:, 0], new_ids)
    with reader.try_writer():  # only its own write since the refresh
        reader.update_manifest(dba=None)
    assert reader.refresh_if_changed() is False
    reader.close()


# -- edge cases --------------------------------------------------------------------------


@pytest.mark.parametrize("conf", [*BACKEND_CONFS, IndexConf(factory="IVF16,Flat")])
def test_empty_index_search(root: Path, conf: IndexConf) -> None:
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
        scores, found = store.search(unit(3), 4)
        assert found.shape == (3, 4) and (found == -1).all() and np.isneginf(scores).all()
        scores, found = store.search(unit(3), 0)  # "all" of nothing
        assert found.shape == (3, 0) and scores.shape == (3, 0)
        store.checkpoint()
        assert store.stats()["live"] == 0
    with IndexStore.open(root) as reader:
        assert (reader.search(unit(1), 2)[1] == -1).all()


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_k_larger_than_index_and_k_zero(root: Path, conf: IndexConf) -> None:
    x = unit(5)
    with IndexStore.create(root, DESCRIPTOR, D, conf) as store:
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
        with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
            store.vector_source().to_index_space(unit(1, d=16))
        assert store.count() == {"ok": 2, "error": 0}  # failed batches left nothing behind
        assert (root / "vectors.f32").stat().st_size == 2 * D * 4


def test_search_params_can_change(root: Path) -> None:
    fill(root, IndexConf(factory="IVF16,Flat"), n=20)
    with IndexStore.open(root, writable=True) as writer:
        writer.set_search_params(nprobe=3, ef_search=50)
        assert writer.conf == IndexConf("IVF16,Flat", nprobe=3, ef_search=50)
    assert json.loads((root / "manifest.json").read_text())["index"]["nprobe"] == 3
    with IndexStore.open(root) as reader:
        assert reader.conf == IndexConf("IVF16,Flat", nprobe=3, ef_search=50)
        reader.set_search_params(nprobe=7)  # a reader's own, not recorded
        assert reader.conf.nprobe == 7
    assert json.loads((root / "manifest.json").read_text())["index"]["nprobe"] == 3


def test_search_params_reach_a_trained_structure(root: Path) -> None:
    fill(root, IndexConf(factory="IVF16,Flat"), n=1000)  # trained at the checkpoint
    with IndexStore.open(root) as reader:
        assert reader.stats()["trained"] and reader.stats()["search_params"] == {"nprobe": 16}
        reader.set_search_params(nprobe=2)
        assert reader.stats()["search_params"] == {"nprobe": 2}


def test_importing_the_index_does_not_import_torch() -> None:
    child = run_python("import sys, lookalike.index; print('torch' in sys.modules)")
    out, err = child.communicate(timeout=60)
    assert out.strip() == "False", err


def test_a_readers_own_search_params_never_reach_the_manifest(root: Path) -> None:
    from lookalike.index.manifest import DBASettings, read_manifest

    x = unit(40)
    with IndexStore.create(root, DESCRIPTOR, D, IndexConf(factory="HNSW32")) as store:
        store.add(images(40), x)
        store.checkpoint()
    with IndexStore.open(root) as reader:
        reader.set_search_params(ef_search=7)  # this reader's own
        with reader.try_writer() as ok:
            assert ok
            reader.update_manifest(dba=DBASettings(5, 1.0))  # what a searcher records
        assert reader.conf.ef_search == 7  # still its own
    on_disk = read_manifest(root)
    assert on_disk.index.ef_search == 128 and on_disk.dba == DBASettings(5, 1.0)
