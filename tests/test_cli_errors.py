"""Every fault of the ``lookalike`` command is one line with its exit code.

:func:`lookalike.cli.faults.fault` maps what escapes a stage (``OSError`` by errno, SQLite's
errors, faiss' write failures, bugs) to a message and an exit code; :func:`main` prints it.
Also the search options that used to mislead: one bad query among good ones, ``--box`` with
a negative value, ``--box`` with only ``--id`` queries. Real faults (a full disk, a read-only
directory, damaged files) are in ``test_faults.py``.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from conftest import write_images
from test_cli import cli, json_lines, one_line_error

from lookalike.cli import attach_negative_values, main
from lookalike.cli.faults import fault
from lookalike.errors import (
    ConfigError,
    ImageError,
    IndexLockedError,
    IndexStateError,
    LookalikeError,
    StorageError,
)
from lookalike.indexing import index_folder

INDEX = Path("/data/my.idx")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, default_extractor) -> tuple[list[Path], Path]:
    """``(images, index)``: 5 images indexed with the default preset (read-only)."""
    base = tmp_path_factory.mktemp("errors")
    paths = write_images(base / "images", 5, side=64)
    index_folder(
        base / "images", base / "index", default_extractor.conf, extractor=default_extractor
    )
    return paths, base / "index"


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/my.idx/vectors.f32"),
         StorageError.exit_code, "no space left on the device holding /data/my.idx/vectors.f32"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), StorageError.exit_code,
         "no space left on the device holding /data/my.idx"),
        (OSError(errno.EROFS, "Read-only file system", "/data/my.idx/lock"),
         StorageError.exit_code, "/data/my.idx/lock is on a read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/my.idx/meta.sqlite"),
         StorageError.exit_code, "permission denied: /data/my.idx/meta.sqlite"),
        (OSError(errno.EPERM, "Operation not permitted", "/x"), StorageError.exit_code,
         "permission denied: /x"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/data/my.idx/whitening.npz"),
         IndexStateError.exit_code, "index file /data/my.idx/whitening.npz is missing"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/elsewhere/a.csv"),
         LookalikeError.exit_code, "No such file or directory: /elsewhere/a.csv"),
        (sqlite3.OperationalError("database or disk is full"), StorageError.exit_code,
         "no space left on the device holding /data/my.idx"),
        (sqlite3.OperationalError("attempt to write a readonly database"),
         StorageError.exit_code, "the directory is read-only or not permitted"),
        (sqlite3.OperationalError("database is locked"), IndexLockedError.exit_code,
         "locked by another process"),
        (sqlite3.OperationalError("disk I/O error"), StorageError.exit_code, "disk I/O error"),
        (sqlite3.DatabaseError("database disk image is malformed"), IndexStateError.exit_code,
         "/data/my.idx/meta.sqlite is damaged (database disk image is malformed)"),
        (sqlite3.OperationalError("no such table: kv"), IndexStateError.exit_code,
         "meta.sqlite is damaged (no such table: kv)"),
        (RuntimeError("Error in faiss::FileIOWriter: No space left on device"),
         StorageError.exit_code, "no space left on the device holding /data/my.idx"),
        (StorageError("no space on X"), StorageError.exit_code, "no space on X"),
        (ValueError("cannot reshape"), LookalikeError.exit_code,
         "unexpected ValueError: cannot reshape (a bug in lookalike; rerun with -vv"),
    ],
)  # fmt: skip
def test_faults_map_to_one_message_and_an_exit_code(error, code, words):
    message, got = fault(error, INDEX)
    assert got == code
    assert words in message and "\n" not in message


def test_main_prints_any_fault_in_one_line(indexed, capsys, monkeypatch, caplog):
    import lookalike.indexing

    paths, index = indexed
    raised: list[BaseException] = [
        OSError(errno.ENOSPC, "No space left on device", str(index / "meta.sqlite")),
        sqlite3.DatabaseError("file is not a database"),
        KeyError("dim"),
    ]

    def failing(*args: object, **kwargs: object) -> None:
        raise raised.pop(0)

    monkeypatch.setattr(lookalike.indexing, "index_folder", failing)
    folder = paths[0].parent
    for code, words in (
        (StorageError.exit_code, "no space left on the device holding"),
        (IndexStateError.exit_code, "is damaged (file is not a database)"),
        (LookalikeError.exit_code, "unexpected KeyError"),
    ):
        rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", "0")
        assert rc == code and out == ""
        assert words in one_line_error(err)
    monkeypatch.setattr(lookalike.indexing, "index_folder", lambda *a, **k: 1 / 0)
    rc, _, err = cli(capsys, "-vv", "index", folder, "--index", index)
    assert rc == 1 and "unexpected ZeroDivisionError" in err
    assert "Traceback" in err  # -vv: the bug's traceback is logged, after the one line


def test_one_bad_query_among_good_ones(indexed, tmp_path, capsys):
    paths, index = indexed
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    queries = [paths[1], bad, paths[3]]
    rc, out, err = cli(capsys, "search", "--index", index, *queries, "-k", 2)
    assert rc == ImageError.exit_code
    assert str(bad) in one_line_error(err)
    assert out.count("2 results") == 2 and str(paths[1]) in out and str(paths[3]) in out
    rc, out, err = cli(capsys, "search", "--index", index, *queries, "--id", 999, "-k", 1, "--json")
    assert rc == ImageError.exit_code  # the first failure's kind
    lines = json_lines(out)
    assert [sorted(line) for line in lines] == [
        ["query", "results"],
        ["error", "query"],
        ["query", "results"],
        ["error", "query"],
    ]
    assert [lines[0]["results"][0]["path"], lines[2]["results"][0]["path"]] == [
        str(paths[1].resolve()),
        str(paths[3].resolve()),
    ]
    assert lines[1]["query"] == str(bad) and str(bad) in lines[1]["error"]
    assert "no image with id 999" in lines[3]["error"]
    assert [line.split(":")[0] for line in err.splitlines()] == ["error", "error"]
    rc, out, err = cli(capsys, "search", "--index", index, "--id", 999, 1)
    assert rc == ConfigError.exit_code and "id:999" in one_line_error(err)


def test_a_box_may_start_with_a_minus(indexed, capsys):
    paths, index = indexed
    for box in (["--box", "-20,-20,40,40"], ["--box=-20,-20,40,40"]):
        rc, out, err = cli(capsys, "search", "--index", index, paths[0], *box, "--json", "-k", 1)
        assert rc == 0, err
        assert json_lines(out)[0]["results"][0]["path"] == str(paths[0].resolve())
    rc, out, err = cli(capsys, "search", "--index", index, paths[0], "--box", "-100,-100,-50,-50")
    assert rc == ImageError.exit_code and "empty inside" in one_line_error(err)  # a value


def test_attach_negative_values():
    assert attach_negative_values(["search", "--box", "-1,-2,3,4", "-k", "3"]) == [
        "search",
        "--box=-1,-2,3,4",
        "-k",
        "3",
    ]
    assert attach_negative_values(["--box", "-.5,0,1,1"]) == ["--box=-.5,0,1,1"]
    unchanged = (["--box", "1,2,3,4"], ["--box", "--json"], ["--box"], ["--", "--box", "-1"])
    for argv in unchanged:
        assert attach_negative_values(argv) == argv
    assert main(["search", "--index", "x", "--box"]) == 2  # still a usage error


def test_box_with_only_id_queries_is_refused(indexed, capsys):
    paths, index = indexed
    rc, out, err = cli(capsys, "search", "--index", index, "--id", 1, "--box", "0,0,10,10")
    assert rc == ConfigError.exit_code and out == ""
    line = one_line_error(err)
    assert "--box" in line and "--id" in line
    # with images too, the box crops the images only
    rc, out, err = cli(
        capsys, "search", "--index", index, paths[2], "--id", 1, "--box", "0,0,40,40"
    )
    assert rc == 0, err
