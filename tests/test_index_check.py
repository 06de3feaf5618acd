"""Checked files: block digests of the vectors, digests of the whitening, checkpoint and DBA,
the cheap checks on opening, ``check_index`` / ``lookalike check`` finding each kind of
damage in one line, ``repair_index`` / ``lookalike repair`` mending it, schema 1 databases,
and the environment's refusals as one StorageError."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from built_index import DIM, build_index
from index_helpers import DESCRIPTOR, D, fill, images, unit

import lookalike.confined as confined
import lookalike.storage as storage
from lookalike.cli import main
from lookalike.confined import file_digest
from lookalike.errors import IndexStateError, StorageError
from lookalike.index import IndexConf, IndexStore, NewImage
from lookalike.index.check import check_index
from lookalike.index.repair import REDESCRIBE_REASON, repair_index
from lookalike.index.vectors import BLOCK_ROWS


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_index(tmp_path_factory.mktemp("check"))


@pytest.fixture
def index(pristine, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine[1], tmp_path / "index"))


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def flip(path: Path, offset: int, data: bytes = b"\x5a\xa5\x5a\xa5") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- digests are recorded ------------------------------------------------------------------


def test_every_checked_file_has_its_digest_recorded(index: Path) -> None:
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["whitening"]["sha"] == file_digest(index / "whitening.npz")
    assert manifest["checkpoint"]["sha"] == file_digest(index / manifest["checkpoint"]["file"])
    assert manifest["dba"]["sha"] == file_digest(index / "dba.npz")
    conn = sqlite3.connect(index / "meta.sqlite")
    blocks = conn.execute("SELECT block, rows FROM vector_blocks").fetchall()
    version = conn.execute("SELECT value FROM kv WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert blocks == [(0, 6)] and version == ("2",)


@pytest.mark.parametrize("batches", [[5], [BLOCK_ROWS - 1, 1, 3], [3, 2 * BLOCK_ROWS + 7, 1]])
def test_block_digests_follow_appends_and_compaction(root: Path, batches: list[int]) -> None:
    store = IndexStore.create(root, DESCRIPTOR, D)
    start = 0
    for n in batches:  # the last partial block is digested again as it grows
        store.add(images(n, prefix=f"/b{start}"), unit(n, seed=start))
        start += n
    store.close()
    with IndexStore.open(root, writable=True) as store:  # another writer: from the file
        store.add(images(2, prefix="/more"), unit(2, seed=99))
        report = check_index(root)
        assert report.sound, report.problems
        assert report.blocks == -(-(start + 2) // BLOCK_ROWS) and not report.notes
        store.remove(list(range(1, start // 2 + 2)))
        store.compact()
    report = check_index(root)
    assert report.sound and report.images == start + 2 - (start // 2 + 1), report.problems


def test_an_unrepaired_block_is_not_blessed_by_the_next_append(root: Path) -> None:
    store = IndexStore.create(root, DESCRIPTOR, D)
    store.add(images(5), unit(5))
    store.close()
    flip(root / "vectors.f32", 4 * D * 2)
    with IndexStore.open(root, writable=True) as store:
        with pytest.raises(IndexStateError, match=r"rows 0-4 of .* do not match.*lookalike repair"):
            store.add(images(1, prefix="/new"), unit(1, seed=3))
        assert len(store) == 5  # nothing committed


# -- check and repair, damage by damage ------------------------------------------------------


def test_a_sound_index_checks_sound(index: Path, capsys) -> None:
    rc, out, _ = cli(capsys, "check", "--index", index)
    assert rc == 0 and "sound; 6 images, 1 vector blocks checked" in out
    rc, out, _ = cli(capsys, "check", "--index", index, "--json")
    report = json.loads(out)
    assert rc == 0 and report["sound"] and report["problems"] == [] and report["images"] == 6
    rc, out, _ = cli(capsys, "repair", "--index", index)
    assert rc == 0 and "nothing to repair" in out


def test_check_refuses_what_is_not_an_index(tmp_path: Path, capsys) -> None:
    rc, _, err = cli(capsys, "check", "--index", tmp_path / "nowhere")
    assert rc == 4 and "does not exist" in error_line(err)


def test_an_overwritten_vector_row_is_found_and_its_image_described_again(index, capsys):
    with IndexStore.open(index) as store:
        expected = store.search(store.vectors([1, 2]), 1)[1]
        third = store.get([3])[0]
    flip(index / "vectors.f32", 2 * DIM * 4 + 100)  # inside the row of image 3
    rc, out, _ = cli(capsys, "check", "--index", index)
    assert rc == 4 and "vectors.f32: rows 0-5 do not match their digest" in out
    assert f"damaged vectors of {third.path} (id 3)" not in out  # block: all 6 named
    assert "(id 1)" in out and "lookalike repair" in out
    rc, out, err = cli(capsys, "repair", "--index", index)
    assert rc == 0 and "6 images to describe again" in out, out + err
    report = check_index(index)
    assert report.sound, report.problems
    with IndexStore.open(index) as store:
        assert len(store) == 0 and store.count() == {"ok": 0, "error": 6}
        record = store.get([3])[0]
        assert record.error == REDESCRIBE_REASON and record.size is None and record.mtime is None
        assert record.metadata == third.metadata and record.path == third.path
    assert expected.shape == (2, 1)


def test_repair_marks_only_the_images_of_the_damaged_block(root: Path) -> None:
    x, ids = fill(root, n=3 * BLOCK_ROWS)
    flip(root / "vectors.f32", (BLOCK_ROWS + 5) * D * 4)
    report = check_index(root)
    assert [p.action for p in report.problems] == ["redescribe", "redescribe"]
    repaired = repair_index(root)
    assert len(repaired.redescribe) == BLOCK_ROWS and repaired.sound, repaired.left
    with IndexStore.open(root) as store:
        assert len(store) == 2 * BLOCK_ROWS
        kept = ids[:BLOCK_ROWS] + ids[2 * BLOCK_ROWS :]
        np.testing.assert_array_equal(store.search(x[:BLOCK_ROWS], 1)[1][:, 0], kept[:BLOCK_ROWS])
        assert store.vectors([ids[-1]]).tobytes() == x[-1].tobytes()
    assert check_index(root).sound


def test_a_damaged_row_is_refused_when_read_never_searched_with(root: Path, capsys) -> None:
    """Reads check the digests of the blocks they touch: a query by the id of a damaged row
    (or anything reading it: QE, DBA, a rebuild) is refused in one line, the other blocks
    are read as before."""
    x, ids = fill(root, n=2 * BLOCK_ROWS + 3)
    with IndexStore.open(root) as store:
        store.vectors([ids[0]])  # block 0 read and verified once, before the damage
    flip(root / "vectors.f32", (BLOCK_ROWS + 5) * D * 4, np.full(4, 0.01, np.float32).tobytes())
    with IndexStore.open(root) as store:
        assert store.vectors([ids[0], ids[-1]]).tobytes() == x[[0, -1]].tobytes()
        with pytest.raises(IndexStateError, match="do not match their recorded digest") as error:
            store.vectors([ids[BLOCK_ROWS + 7]])  # another row of the damaged block
        assert f"/img/{BLOCK_ROWS}.jpg" in str(error.value) and "lookalike repair" in str(
            error.value
        )
    rc = main(["search", "--index", str(root), "--id", str(ids[BLOCK_ROWS])])
    assert rc == 4 and "do not match their recorded digest" in error_line(capsys.readouterr().err)
    (root / f"faiss-{len(ids)}.index").unlink()  # a rebuild reads every row: refused too
    with pytest.raises(IndexStateError, match="recorded digest"), IndexStore.open(root) as store:
        store.search(x[:1], 1)
    assert repair_index(root).sound
    with IndexStore.open(root) as store:
        assert len(store) == len(ids) - BLOCK_ROWS
        assert store.vectors([ids[-1]]).tobytes() == x[-1].tobytes()


def test_a_nan_row_is_one_line_naming_the_image(root: Path, capsys) -> None:
    fill(root, n=10)
    (root / "faiss-10.index").unlink()  # loading then reads the vectors
    flip(root / "vectors.f32", 4 * D * 4, np.full(D, np.nan, np.float32).tobytes())
    with pytest.raises(IndexStateError, match=r"vector of /img/4.jpg \(id 5\) holds NaN") as info:
        IndexStore.open(root)
    assert "lookalike repair" in str(info.value) and "\n" not in str(info.value)
    report = check_index(root)
    assert any("hold NaN or infinite values" in p.message for p in report.problems)
    assert repair_index(root).sound
    with IndexStore.open(root) as store:  # its block's digest differs too: all of block 0
        assert len(store) == 0 and store.get([5])[0].status == "error"


def test_a_truncated_vector_file_is_refused_on_opening(index: Path, capsys) -> None:
    path = index / "vectors.f32"
    with open(path, "r+b") as f:
        f.truncate(4 * DIM * 4 + 17)
    for argv in (["info", "--index", index], ["search", "--index", index, "--id", "1"]):
        rc, _, err = cli(capsys, *argv)
        line = error_line(err)
        assert rc == 4 and "holds 4 rows but meta.sqlite references 6" in line
        assert "lookalike repair" in line
    report = repair_index(index)
    assert report.sound and len(report.redescribe) == 6, report  # rows 4, 5 and their block
    with IndexStore.open(index) as store:
        assert len(store) == 0


def test_a_damaged_checkpoint_is_rebuilt(index: Path, caplog, capsys) -> None:
    name = json.loads((index / "manifest.json").read_text())["checkpoint"]["file"]
    size = (index / name).stat().st_size
    flip(index / name, size - 40)  # inside the vectors: faiss reads it without complaint
    with IndexStore.open(index) as store:
        np.testing.assert_array_equal(store.search(store.vectors([2]), 1)[1], [[2]])
    assert "does not match its recorded digest; rebuilding" in caplog.text
    rc, out, _ = cli(capsys, "check", "--index", index)
    assert rc == 4 and f"{name}: does not match its recorded digest" in out
    report = repair_index(index)
    assert report.sound and report.checkpoint_rebuilt and not report.redescribe


@pytest.mark.parametrize("damage", ["garbage", "deleted", "other"])
def test_a_damaged_whitening_is_refused_never_searched_unwhitened(index, capsys, damage):
    path = index / "whitening.npz"
    if damage == "garbage":
        path.write_bytes(b"not a whitening")
    elif damage == "deleted":
        path.unlink()
    else:  # a valid whitening, but not the one the index was built with
        from built_index import random_whitening

        random_whitening(seed=7).save(path)
    for argv in (
        ["search", "--index", index, "--id", "1"],
        ["index", index.parent / "photos-none", "--index", index],
    ):
        rc, _, err = cli(capsys, *argv)
        if argv[0] == "index" and rc != 4:
            continue  # (no such folder: refused before the index is opened)
        assert rc == 4 and f"repair --index {index}" in error_line(err)
    rc, out, _ = cli(capsys, "check", "--index", index)
    assert rc == 4 and "whitening.npz" in out and "learns the whitening again" in out
    with pytest.raises(IndexStateError, match="6 searchable images left, it needs 32"):
        repair_index(index)  # too few images to learn one again: refused


@pytest.mark.slow  # 40 images, a 1280-d whitening learned twice
def test_a_lost_whitening_is_learned_again_with_a_warning(tmp_path: Path, capsys) -> None:
    _, index = build_index(tmp_path, n=40, dba=False, local=False)
    (index / "whitening.npz").unlink()
    rc, out, err = cli(capsys, "repair", "--index", index)
    assert rc == 0 and "whitening learned again" in out
    assert "differs from the original one" in err
    with IndexStore.open(index) as store:
        assert store.whitening is not None and store.manifest.whitening.learned
        np.testing.assert_array_equal(store.search(store.vectors([7]), 1)[1], [[7]])
    assert check_index(index).sound


def test_a_damaged_dba_is_recomputed(index: Path, capsys, caplog) -> None:
    flip(index / "dba.npz", 200)
    assert [p.action for p in check_index(index).problems] == ["recompute"]
    rc, _, _ = cli(capsys, "search", "--index", index, "--id", "1", "--rerank", "dba")
    assert rc == 0 and "dba.npz" in caplog.text and "computing it again" in caplog.text
    assert check_index(index).sound  # the search stored the DBA it computed, and its digest
    flip(index / "dba.npz", 200)
    report = repair_index(index)
    assert report.dba_removed and report.sound and not (index / "dba.npz").exists(), report
    rc, _, _ = cli(capsys, "search", "--index", index, "--id", "1", "--rerank", "dba")
    assert rc == 0 and (index / "dba.npz").exists() and check_index(index).sound


def test_damaged_local_features_are_dropped(index: Path) -> None:
    with open(index / "local" / "features.bin", "r+b") as f:
        f.truncate(100)
    report = check_index(index)
    assert [p.action for p in report.problems] == ["drop-local"]
    assert "local/features.bin: holds 100 bytes" in report.problems[0].line()
    repaired = repair_index(index)
    assert repaired.local_removed and repaired.sound and not (index / "local").exists()


def test_a_damaged_database_is_found_and_not_guessed_at(index: Path, capsys) -> None:
    db = index / "meta.sqlite"
    conn = sqlite3.connect(db)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root_page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'ops'").fetchone()
    conn.close()
    flip(db, (root_page[0] - 1) * page, b"\x0d\xff\xff\xff\xff\xff\xff\xff")  # its header
    report = check_index(index)
    assert report.problems and all(p.action == "none" for p in report.problems)
    assert report.problems[0].file == "meta.sqlite"
    rc, _, err = cli(capsys, "repair", "--index", index)
    assert rc == 4 and "cannot repair" in error_line(err)


def test_a_zero_byte_database_is_one_line(index: Path, capsys) -> None:
    (index / "meta.sqlite").write_bytes(b"")
    rc, _, err = cli(capsys, "info", "--index", index)
    assert rc == 4 and "holds no index tables" in error_line(err)


# -- schema 1 ---------------------------------------------------------------------------------


def to_schema_1(db: Path) -> None:
    """What an index written before schema 2 looks like: no raw_path, no block digests."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(
        """
        BEGIN;
        CREATE TABLE old (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT UNIQUE NOT NULL,
            content_hash TEXT, size INTEGER, mtime REAL, width INTEGER, height INTEGER,
            metadata TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL, error TEXT,
            slot INTEGER, seq INTEGER NOT NULL, added TEXT, updated TEXT);
        INSERT INTO old SELECT id, path, content_hash, size, mtime, width, height, metadata,
            status, error, slot, seq, added, updated FROM images;
        DROP TABLE images;
        ALTER TABLE old RENAME TO images;
        CREATE INDEX images_status ON images(status);
        DROP TABLE vector_blocks;
        UPDATE sqlite_sequence SET seq = 500 WHERE name = 'images';
        UPDATE kv SET value = '1' WHERE key = 'schema_version';
        DELETE FROM kv WHERE key = 'block_rows';
        COMMIT;
        """
    )
    conn.close()


def test_a_schema_1_index_is_read_as_it_is_and_migrated_by_a_writer(root: Path) -> None:
    x, ids = fill(root, n=100)
    to_schema_1(root / "meta.sqlite")
    with IndexStore.open(root) as reader:  # a reader computes nothing, writes nothing
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
        assert reader.find_path("/img/7.jpg").id == ids[7]
    report = check_index(root)
    assert report.sound and report.blocks == 0 and "no recorded digest" in report.notes[0]
    with IndexStore.open(root, writable=True) as writer:
        new = writer.add([NewImage("/img/new.jpg")], unit(1, seed=5))
        assert new == [501]  # the AUTOINCREMENT counter survived the migration
        assert writer.find_path("/img/7.jpg").id == ids[7]
    report = check_index(root)
    assert report.sound and report.blocks == -(-101 // BLOCK_ROWS) and not report.notes


# -- the environment's refusals ---------------------------------------------------------------


def test_a_full_disk_is_one_storage_error(root: Path, monkeypatch) -> None:
    fill(root, n=10)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with IndexStore.open(root, writable=True) as store:
        monkeypatch.setattr(storage.os, "pwrite", full)
        with pytest.raises(StorageError, match=r"vectors.f32: the disk is full.*free some space"):
            store.add(images(2, prefix="/new"), unit(2, seed=1))
        monkeypatch.undo()
        monkeypatch.setattr(confined.os, "write", full)
        store.add(images(2, prefix="/new"), unit(2, seed=1))
        with pytest.raises(StorageError, match=r"faiss-\d+.index: the disk is full"):
            store.checkpoint()
        monkeypatch.undo()
        assert not list(root.glob("*.tmp"))
        store.conn_pages = store._db.conn.execute("PRAGMA page_count").fetchone()[0]
        store._db.conn.execute(f"PRAGMA max_page_count = {store.conn_pages}")
        with pytest.raises(StorageError, match=r"meta.sqlite: the disk is full"):
            store.add(images(300, prefix="/many"), unit(300, seed=2))
    assert check_index(root).sound
    with IndexStore.open(root) as store:
        assert len(store) == 12


def test_sqlites_io_error_on_a_nearly_full_disk_is_a_full_disk(tmp_path: Path, monkeypatch):
    """SQLite says "disk I/O error" when it cannot make its shared-memory file: with next to
    no space left that is a full disk, not damage."""
    io_error = sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(confined, "NEARLY_FULL", 0)  # plenty of space: not mapped
    assert confined.storage_error(io_error, tmp_path / "meta.sqlite") is None
    monkeypatch.setattr(confined, "NEARLY_FULL", 1 << 62)  # any disk is nearly full now
    error = confined.storage_error(io_error, tmp_path / "gone" / "meta.sqlite")
    assert isinstance(error, StorageError) and "the disk is full" in str(error)


def test_a_read_only_index_refuses_writers_with_a_storage_error(root: Path) -> None:
    from conftest import read_only_view

    fill(root, n=5, conf=IndexConf())
    with read_only_view(root) as view:
        with pytest.raises(StorageError, match="lock file"):
            IndexStore.open(view, writable=True)
        with IndexStore.open(view) as reader:
            assert len(reader) == 5


@pytest.mark.slow  # describes 8 images twice with the default model
def test_images_repair_takes_out_are_described_again_by_the_next_index(
    tmp_path: Path, default_extractor
) -> None:
    from conftest import write_images

    from lookalike.indexing import index_folder

    folder = tmp_path / "photos"
    write_images(folder, 8, side=64)
    index = tmp_path / "index"
    index_folder(folder, index, extractor=default_extractor)
    with IndexStore.open(index) as store:
        ids = [r.id for r in store.records()]
        before = store.vectors(ids)
    flip(index / "vectors.f32", 3 * DIM * 4 + 64)
    repaired = repair_index(index)
    assert len(repaired.redescribe) == 8 and repaired.sound
    report = index_folder(folder, index, extractor=default_extractor)
    assert report.updated == 8 and not report.failed, report
    with IndexStore.open(index) as store:
        assert [r.id for r in store.records()] == ids and len(store) == 8  # ids kept
        np.testing.assert_allclose(store.vectors(ids), before, atol=1e-5)
    assert check_index(index).sound
