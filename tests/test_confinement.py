"""Confinement: lookalike reads and writes only fixed names inside an index directory and
never follows a link there. A symbolic link (or a directory, a fifo) planted at every fixed
name, and a foreign file name in the index's own data (``../../x``, an absolute path), make
``open``, ``search``, ``index``, ``remove``, ``info`` and ``check`` either work without
touching it or stop with one line naming it; the file outside is never written."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from built_index import build_index

from lookalike.cli import main
from lookalike.errors import LookalikeError
from lookalike.index import IndexStore

CHECKPOINT = "faiss-6.index"  # what build_index's checkpoint is called
PLANTED = [
    "manifest.json",
    "meta.sqlite",
    "meta.sqlite-wal",
    "meta.sqlite-shm",
    "meta.sqlite-journal",
    "vectors.f32",
    "whitening.npz",
    "dba.npz",
    CHECKPOINT,
    "lock",
    "regions.sqlite",
    "manifest.json.tmp",
    "whitening.npz.tmp",
    "local/local.sqlite",
    "local/local.sqlite-wal",
    "local/local.sqlite-shm",
    "local/features.bin",
]
# What `check` reports (scratch names are only ever removed, never opened), and what some
# other command must refuse (regions.sqlite is opened only by a run that learns a whitening).
CHECKED = set(PLANTED) - {"manifest.json.tmp", "whitening.npz.tmp"}
USED = CHECKED - {"regions.sqlite"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_index(tmp_path_factory.mktemp("confinement"))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the index, with known bytes and an old mtime."""
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir()
    path.write_bytes(b"precious bytes, not an index file\n" * 100)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return path


def untouched(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def copy_index(pristine: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine[1], tmp_path / "index", symlinks=True))


def run_all(folder: Path, root: Path, capsys) -> dict[str, tuple[int, str]]:
    """Every command on ``root``: ``{name: (exit status, its error line or '')}``."""
    capsys.readouterr()
    out: dict[str, tuple[int, str]] = {}
    for writable in (False, True):
        try:
            IndexStore.open(root, writable=writable).close()
            out[f"open-{writable}"] = (0, "")
        except LookalikeError as error:
            message = str(error)
            assert "\n" not in message
            out[f"open-{writable}"] = (error.exit_code, message)
    commands = {
        "check": ["check", "--index", root],  # first: writers remove scratch names
        "search": ["search", "--index", root, "--id", "1", "--rerank", "dba,verify",
                   "--local", "sift", "-q"],
        "index": ["index", folder, "--index", root, "-q"],
        "remove": ["remove", "--index", root, "--id", "999"],
        "info": ["info", "--index", root],
    }  # fmt: skip
    for name, argv in commands.items():
        rc = main([str(a) for a in argv])  # an exception here is a traceback: the test fails
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) <= 1, err
        if name == "check":
            out[name] = (rc, "")
        else:
            assert (rc == 0) == (not errors), (name, rc, err)
            out[name] = (rc, errors[0] if errors else "")
    return out


def plant(root: Path, name: str, kind: str, victim: Path) -> None:
    entry = root / name
    if entry.exists() or entry.is_symlink():
        entry.unlink()
    if kind == "symlink":
        entry.symlink_to(victim)
    elif kind == "dir":
        entry.mkdir()
    else:
        os.mkfifo(entry)


@pytest.mark.parametrize("name", PLANTED)
def test_a_symlink_at_a_fixed_name_is_never_followed(pristine, tmp_path, victim, capsys, name):
    root = copy_index(pristine, tmp_path)
    plant(root, name, "symlink", victim)
    before = untouched(victim)
    results = run_all(pristine[0], root, capsys)
    assert untouched(victim) == before
    refused = {k: m for k, (rc, m) in results.items() if rc != 0}
    if name in CHECKED:
        assert results["check"][0] == 4  # check names it as a problem
    for message in refused.values():
        if message:
            assert "symbolic link" in message or "not" in message, message
    named = [m for m in refused.values() if str(root / name) in m]
    if name in USED:
        assert named, refused  # at least one command names the entry
        assert all("never follows links" in m for m in named)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("vectors.f32", "fifo"), ("dba.npz", "dir"), (CHECKPOINT, "fifo"), ("lock", "dir")],
)
def test_other_entries_at_fixed_names_are_refused(pristine, tmp_path, victim, capsys, name, kind):
    root = copy_index(pristine, tmp_path)
    plant(root, name, kind, victim)
    results = run_all(pristine[0], root, capsys)  # a fifo never blocks a command
    named = [m for rc, m in results.values() if rc and str(root / name) in m]
    assert named and all("move it away" in m for m in named), results


def test_a_symlinked_local_directory_is_refused(pristine, tmp_path, victim, capsys):
    root = copy_index(pristine, tmp_path)
    outside = victim.parent / "local-copy"
    shutil.move(root / "local", outside)
    (root / "local").symlink_to(outside)
    before = {p.name: untouched(p) for p in outside.iterdir()}
    results = run_all(pristine[0], root, capsys)
    assert {p.name: untouched(p) for p in outside.iterdir()} == before
    named = [m for rc, m in results.values() if rc and f"{root / 'local'} is a symbolic link" in m]
    assert named, results


def set_kv(db: Path, key: str, value: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE kv SET value = ? WHERE key = ?", (value, key))
    conn.close()


@pytest.mark.parametrize("foreign", ["../../x", "absolute", "vectors.f32/../x", "notes.txt"])
def test_a_foreign_vector_file_name_is_refused(pristine, tmp_path, victim, capsys, foreign):
    root = copy_index(pristine, tmp_path)
    value = str(victim) if foreign == "absolute" else foreign
    set_kv(root / "meta.sqlite", "vectors_file", value)
    before = untouched(victim)
    results = run_all(pristine[0], root, capsys)
    assert untouched(victim) == before and not (tmp_path / "x").exists()
    for name, (rc, message) in results.items():
        if name != "check":
            assert rc == 4 and "vectors_file" in message and repr(value) in message, name
    assert results["check"][0] == 4


def test_a_foreign_checkpoint_name_is_refused(pristine, tmp_path, victim, capsys):
    root = copy_index(pristine, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["checkpoint"]["file"] = "../../x"
    (root / "manifest.json").write_text(json.dumps(manifest))
    results = run_all(pristine[0], root, capsys)
    assert not (tmp_path / "x").exists()
    for name, (rc, message) in results.items():
        if name != "check":
            assert rc == 4 and "checkpoint.file" in message, (name, message)


@pytest.mark.parametrize("foreign", ["../victim", "absolute"])
def test_a_foreign_local_data_name_is_refused(pristine, tmp_path, victim, capsys, foreign):
    root = copy_index(pristine, tmp_path)
    value = str(victim) if foreign == "absolute" else "../../outside/victim"
    set_kv(root / "local" / "local.sqlite", "data_file", value)
    before = untouched(victim)
    results = run_all(pristine[0], root, capsys)
    assert untouched(victim) == before
    assert results["search"][0] == 4 and "data_file" in results["search"][1]
    assert results["check"][0] == 4


def test_the_index_directory_may_be_a_link(pristine, tmp_path, capsys):
    root = copy_index(pristine, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(root)
    results = run_all(pristine[0], link, capsys)
    assert all(rc == 0 for rc, _ in results.values()), results
