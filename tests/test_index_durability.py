"""IndexStore durability: replay, refresh, crash safety (SIGKILL), locking, compaction.

Real SQLite, vector and backend files in ``tmp_path``, on an exact configuration of every
registered backend where the backend matters; writers that crash or compete run in
subprocesses, since ``flock`` belongs to an open file description.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from index_helpers import BACKEND_CONFS, DESCRIPTOR, D, fill, images, run_python, unit

from lookalike.errors import IndexLockedError, IndexStateError
from lookalike.index import IndexConf, IndexStore, NewImage

# -- readers: replay and refresh ---------------------------------------------------------


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_reader_replays_ops_without_checkpoint(root: Path, conf: IndexConf) -> None:
    x = unit(100)
    store = IndexStore.create(root, DESCRIPTOR, D, conf)
    ids = store.add(images(100), x)
    store.remove(ids[:10])
    y = unit(3, seed=4)
    assert store.add([NewImage(f"/img/{i}.jpg") for i in (10, 11, 12)], y) == ids[10:13]
    assert store.manifest.checkpoint.file is None
    expected = store.search(x, 3)
    with IndexStore.open(root) as reader:  # while the writer still holds the lock
        assert reader.manifest.checkpoint.file is None
        _, found = reader.search(x, 1)
        np.testing.assert_array_equal(found[13:, 0], ids[13:])
        np.testing.assert_array_equal(reader.search(y, 1)[1][:, 0], ids[10:13])
        assert not np.isin(found[:10], ids[:10]).any() and len(reader) == 90
        np.testing.assert_array_equal(reader.search(x, 3)[1], expected[1])
        assert reader.stats()["live"] == 90
    store.close()


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_reader_sees_new_commits_after_refresh(root: Path, conf: IndexConf) -> None:
    x, ids = fill(root, conf)
    reader = IndexStore.open(root)
    assert reader.search(x[:1], 1)[1][0, 0] == ids[0]
    y = unit(5, seed=3)
    with IndexStore.open(root, writable=True) as writer:
        new_ids = writer.add(images(5, prefix="/new"), y)
        writer.remove([ids[0]])
    assert reader.search(y, 1)[1][0, 0] not in new_ids  # still the old snapshot
    assert reader.search(x[:1], 1)[1][0, 0] == ids[0]
    reader.refresh()
    np.testing.assert_array_equal(reader.search(y, 1)[1][:, 0], new_ids)
    assert ids[0] not in reader.search(x[:1], 0)[1]
    reader.close()


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_checkpoint_plus_replay_equals_writer(root: Path, conf: IndexConf) -> None:
    x, ids = fill(root, conf)
    with IndexStore.open(root, writable=True) as writer:
        first = writer.manifest.checkpoint.file
        assert first == f"{conf.backend}-200.index" and writer.manifest.checkpoint.seq == 200
        writer.add(images(30, prefix="/more"), unit(30, seed=9))
        writer.remove(ids[50:80])
        writer.add(images(5), unit(5, seed=10))  # updates
        expected = writer.search(x, 5)
        with IndexStore.open(root) as reader:  # checkpoint + replay of the ops after it
            assert reader.manifest.checkpoint.file == first
            np.testing.assert_array_equal(reader.search(x, 5)[1], expected[1])
            np.testing.assert_allclose(reader.search(x, 5)[0], expected[0], atol=1e-6)
        writer.checkpoint()
        name = writer.manifest.checkpoint.file
        assert name != first and writer.manifest.checkpoint.seq == int(name.split("-")[1][:-6])
        assert not (root / first).exists()
        assert sorted(p.name for p in root.glob(f"{conf.backend}-*")) == [name]
        writer.checkpoint()  # nothing new: the same file, not rewritten
        assert writer.manifest.checkpoint.file == name
    with IndexStore.open(root) as reader:
        np.testing.assert_array_equal(reader.search(x, 5)[1], expected[1])
        assert reader.stats()["live"] == len(reader) == 200 + 30 - 30


# -- crash safety ------------------------------------------------------------------------


def test_garbage_past_committed_rows_is_ignored(filled) -> None:
    root, x, ids = filled
    vectors = root / "vectors.f32"
    size = vectors.stat().st_size
    assert size == 200 * D * 4
    with open(vectors, "ab") as f:  # a crash between the append and the commit
        f.write(np.full((7, D), np.nan, np.float32).tobytes() + b"\x01\x02")
    with IndexStore.open(root) as reader:
        assert len(reader) == 200
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
    y = unit(3, seed=4)
    with IndexStore.open(root, writable=True) as writer:
        new_ids = writer.add(images(3, prefix="/after"), y)
        assert vectors.stat().st_size == 203 * D * 4  # garbage overwritten and cut
        np.testing.assert_array_equal(writer.vectors(new_ids), y)
        np.testing.assert_array_equal(writer.search(y, 1)[1][:, 0], new_ids)


def test_leftover_tmp_files_are_ignored_then_cleaned(filled) -> None:
    root, x, ids = filled
    (root / "manifest.json.tmp").write_text('{"format": "lookalike-ind')
    (root / "faiss-999.index.tmp").write_bytes(b"\x00" * 100)
    (root / "faiss-3.index").write_bytes(b"stale checkpoint nobody names")
    (root / "numpy-4.index").write_bytes(b"stale checkpoint of another backend")
    (root / "vectors.7.f32").write_bytes(b"\x00" * 64)  # an interrupted compaction's file
    (root / "notes.txt").write_text("the user's")
    with IndexStore.open(root) as reader:
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
    assert (root / "faiss-3.index").exists()  # a reader deletes nothing
    with IndexStore.open(root, writable=True) as writer:
        np.testing.assert_array_equal(writer.search(x, 1)[1][:, 0], ids)
    assert not list(root.glob("*.tmp")) and not (root / "faiss-3.index").exists()
    assert not (root / "numpy-4.index").exists() and not (root / "vectors.7.f32").exists()
    assert (root / "notes.txt").exists() and (root / "faiss-200.index").exists()


@pytest.mark.parametrize("conf", BACKEND_CONFS)
def test_unreadable_or_missing_checkpoint_is_rebuilt(root: Path, conf: IndexConf) -> None:
    x, ids = fill(root, conf)
    name = json.loads((root / "manifest.json").read_text())["checkpoint"]["file"]
    (root / name).write_bytes(b"garbage, not a checkpoint")
    with IndexStore.open(root) as reader:
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
    (root / name).unlink()
    with IndexStore.open(root, writable=True) as writer:
        np.testing.assert_array_equal(writer.search(x, 1)[1][:, 0], ids)
        writer.checkpoint()  # repairs it
        assert (root / writer.manifest.checkpoint.file).exists()
    with IndexStore.open(root) as reader:
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)


def test_missing_vector_file_is_reported_as_damage(filled) -> None:
    root = filled[0]
    (root / "faiss-200.index").unlink()  # so that loading needs the vectors
    (root / "vectors.f32").unlink()
    for writable in (False, True):  # found on opening (a stat), for readers and writers
        with pytest.raises(IndexStateError, match=r"vectors\.f32 is missing.*lookalike repair"):
            IndexStore.open(root, writable=writable)
    with IndexStore.open(root, writable=True, _repairing=True) as writer:
        with pytest.raises(IndexStateError, match=r"vectors\.f32 is missing"):
            writer.vectors([1])
        with pytest.raises(IndexStateError, match=r"holds 0 bytes.*references"):
            writer.add(images(1, prefix="/new"), unit(1))
    assert not (root / "vectors.f32").exists()  # the refused append created nothing


CHILD_WRITER = """
import sys
import numpy as np
from lookalike.index import IndexStore, NewImage
root, batch = sys.argv[1], int(sys.argv[2])
store = IndexStore.open(root, writable=True)
while True:
    x = np.random.default_rng(batch).standard_normal((21, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    batch_images = [NewImage(f"/b{batch}/{i}.jpg") for i in range(20)]
    store.add(batch_images + [NewImage("/shared.jpg", metadata={"batch": batch})], x)
    if batch % 2 == 0:
        store.remove_paths([f"/b{batch - 2}/0.jpg"])
    print(batch, flush=True)
    if batch % 3 == 0:
        store.checkpoint()
    batch += 1
"""


def batch_vectors(batch: int) -> np.ndarray:
    x = np.random.default_rng(batch).standard_normal((21, 32)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sigkill_leaves_a_valid_index(root: Path) -> None:
    IndexStore.create(root, DESCRIPTOR, D).close()
    printed, start = -1, 0
    for delay in (0.0, 0.013, 0.031):
        child = run_python(CHILD_WRITER, str(root), str(start))
        for line in child.stdout:
            printed = int(line)
            if printed >= start + 4:
                break
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
        with IndexStore.open(root) as reader:
            paths = [r.path for r in reader.records()]
            assert len(paths) == len(set(paths)) == len(reader) == reader.count()["ok"]
            present = sorted({int(p.split("/")[1][1:]) for p in paths if p.startswith("/b")})
            assert present == list(range(present[-1] + 1)) and present[-1] >= printed
            last = present[-1]
            for batch in present:  # every committed batch entirely, exactly once
                assert all(reader.find_path(f"/b{batch}/{i}.jpg") for i in range(1, 20)), batch
                first = reader.find_path(f"/b{batch}/0.jpg")
                # even batches delete /b{batch - 2}/0.jpg in a second transaction
                assert first is not None or (batch % 2 == 0 and batch + 2 <= last)
            kept = [reader.find_path(f"/b{last}/{i}.jpg") for i in range(20)]
            kept_ids = [r.id for r in kept if r is not None]
            rows = [i for i, r in enumerate(kept) if r is not None]
            np.testing.assert_array_equal(reader.vectors(kept_ids), batch_vectors(last)[rows])
            shared = reader.find_path("/shared.jpg")
            assert shared.metadata == {"batch": last}
            scores, found = reader.search(batch_vectors(last)[20:], 1)
            assert found[0, 0] == shared.id and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        start = last + 1
    with IndexStore.open(root, writable=True) as writer:  # the next writer carries on
        writer.add(images(2, prefix="/final"), unit(2))
        writer.checkpoint()
        assert not list(root.glob("*.tmp"))


# -- locking -----------------------------------------------------------------------------

CHILD_OPEN = """
import sys
from lookalike.errors import IndexLockedError
from lookalike.index import IndexStore
try:
    IndexStore.open(sys.argv[1], writable=True).close()
except IndexLockedError as error:
    print(error)
    sys.exit(error.exit_code)
print("acquired")
"""


def test_second_writer_is_refused(root: Path) -> None:
    first = IndexStore.create(root, DESCRIPTOR, D)
    with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}") as info:
        IndexStore.open(root, writable=True)
    assert "wait for it to finish or stop it" in str(info.value)
    with pytest.raises(IndexLockedError):
        IndexStore.create(root, DESCRIPTOR, D, exist_ok=True)
    child = run_python(CHILD_OPEN, str(root))
    out, _ = child.communicate(timeout=30)
    assert child.returncode == IndexLockedError.exit_code and f"pid {os.getpid()}" in out
    with IndexStore.open(root) as reader:  # readers never take the lock
        assert len(reader) == 0
    first.close()
    child = run_python(CHILD_OPEN, str(root))
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0 and out.strip() == "acquired", err
    IndexStore.open(root, writable=True).close()


def test_read_only_store_refuses_writes(filled) -> None:
    root, x, _ = filled
    with IndexStore.open(root) as reader:
        for call in (
            lambda: reader.add(images(1), x[:1]),
            lambda: reader.remove([1]),
            lambda: reader.checkpoint(),
            lambda: reader.set_whitening(None),
        ):
            with pytest.raises(IndexStateError, match="read-only"):
                call()
    with pytest.raises(IndexStateError, match="closed"):
        reader.search(x[:1], 1)


# -- compaction --------------------------------------------------------------------------


COMPACT_CONFS = [*BACKEND_CONFS, pytest.param(IndexConf(factory="HNSW32"), id="faiss-HNSW32")]


@pytest.mark.parametrize("conf", COMPACT_CONFS)
def test_compact_drops_dead_rows_and_tombstones(root: Path, conf: IndexConf) -> None:
    x, y = unit(100), unit(10, seed=21)
    store = IndexStore.create(root, DESCRIPTOR, D, conf)
    ids = store.add(images(100), x)
    store.add(images(10), y)  # updates: 10 dead rows
    store.remove(ids[50:60])
    early_reader = IndexStore.open(root)
    expected = store.search(x[60:], 3)
    assert store.stats()["dead"] == (20 if conf.factory == "HNSW32" else 0)
    store.compact()
    assert (root / "vectors.f32").exists() is False
    assert len(list(root.glob("vectors.*.f32"))) == 1
    assert next(root.glob("vectors.*.f32")).stat().st_size == 90 * D * 4
    assert store.stats()["dead"] == 0 and store.stats()["live"] == 90
    assert store.manifest.checkpoint.seq == 130  # 100 adds, 10 updates (2 ops), 10 removals
    np.testing.assert_array_equal(store.search(x[60:], 3)[1], expected[1])
    np.testing.assert_array_equal(store.vectors(ids[:10]), y)
    np.testing.assert_array_equal(store.vectors(ids[60:]), x[60:])
    more = store.add(images(5, prefix="/late"), unit(5, seed=22))  # appends to the new file
    np.testing.assert_array_equal(store.search(unit(5, seed=22), 1)[1][:, 0], more)
    expected = store.search(x[60:], 3)
    store.close()
    early_reader.refresh()  # its ops were pruned: reloads from the new checkpoint
    np.testing.assert_array_equal(early_reader.search(x[60:], 3)[1], expected[1])
    assert len(early_reader) == 95
    early_reader.close()
    with IndexStore.open(root) as reader:
        np.testing.assert_array_equal(reader.search(unit(5, seed=22), 1)[1][:, 0], more)
        np.testing.assert_array_equal(reader.vector_source().live().ids, sorted(reader_ids(reader)))
    with IndexStore.open(root, writable=True) as writer:
        writer.compact()  # no dead rows: the vector file stays
        assert len(list(root.glob("vectors.*.f32"))) == 1


def reader_ids(store: IndexStore) -> list[int]:
    return [r.id for r in store.records("ok")]


def test_failed_compaction_keeps_the_old_state(filled, monkeypatch) -> None:
    from lookalike.index.metadata import MetaDB

    root, x, ids = filled
    with IndexStore.open(root, writable=True) as writer:
        writer.remove(ids[:20])
        expected = writer.search(x, 3)

        def fail(self, through_seq: int) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(MetaDB, "prune_ops", fail)
        with pytest.raises(OSError, match="disk full"):
            writer.compact()
        monkeypatch.undo()
        assert sorted(p.name for p in root.glob("vectors*")) == ["vectors.f32"]  # target gone
        np.testing.assert_array_equal(writer.search(x, 3)[1], expected[1])
        np.testing.assert_array_equal(writer.vectors(ids[20:25]), x[20:25])
    with IndexStore.open(root) as reader:
        assert len(reader) == 180
        np.testing.assert_array_equal(reader.search(x, 3)[1], expected[1])
