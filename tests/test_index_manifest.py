"""The manifest: validation of every field, the write / read round trip, format 1 indexes
(read in memory, upgraded in place by a writer) and the weights hash.

A format 1 index is written by hand exactly as lookalike wrote it before the typed
manifest (commit 0b54257): its ``manifest.json`` and the ``settings`` entry of
``meta.sqlite``'s ``kv`` table, over the vectors and checkpoint of an index made today.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from index_helpers import DESCRIPTOR, D, fill

from lookalike.errors import IndexStateError
from lookalike.index import IndexConf, IndexStore
from lookalike.index.manifest import (
    CheckpointRef,
    DBASettings,
    Manifest,
    ModelIdentity,
    QueryDefaults,
    WhiteningState,
    read_manifest,
    write_manifest,
)
from lookalike.local.conf import VerifyConf

V1_LOCAL = VerifyConf(features="rootsift", max_keypoints=1024, max_side=1024, ratio=0.8)
V1_SETTINGS = {
    "query_rotations": [0, 90, 180, 270],
    "rotation_penalty": 0.02,
    "local": V1_LOCAL.to_dict(),
}


def manifest_json(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def kv(root: Path, key: str) -> str | None:
    with sqlite3.connect(root / "meta.sqlite") as conn:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    conn.close()
    return None if row is None else row[0]


def set_kv(root: Path, key: str, value: str) -> None:
    conn = sqlite3.connect(root / "meta.sqlite")
    with conn:  # one committed transaction, as MetaDB.kv_set did
        conn.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
    conn.close()


def files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """Every file of ``root`` but ``skip``: its bytes and modification time."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.iterdir())
        if p.name not in skip
    }


def make_v1(root: Path, settings: str | None = json.dumps(V1_SETTINGS, sort_keys=True)):
    """An index as format 1 left it: its manifest as 0b54257's ``write_manifest`` wrote it
    (keys in ``new_manifest``'s order, ``index`` without a backend, no model, query, local
    or dba section) and the query / local settings in ``kv.settings``."""
    x, ids = fill(root, IndexConf(factory="Flat", nprobe=8, ef_search=100), n=50)
    m = manifest_json(root)
    v1 = {
        "format": "lookalike-index",
        "format_version": 1,
        "descriptor": m["descriptor"],
        "dim": m["dim"],
        "index": {"factory": "Flat", "nprobe": 8, "ef_search": 100},
        "whitening": {"learned": False, "dim_out": None, "epoch": 0},
        "versions": m["versions"],
        "created": m["created"],
        "updated": m["updated"],
        "checkpoint": m["checkpoint"],
    }
    (root / "manifest.json").write_bytes(json.dumps(v1, indent=2).encode() + b"\n")
    if settings is not None:
        set_kv(root, "settings", settings)
    return x, ids


# -- damaged manifests ---------------------------------------------------------------------


def edit(change: Callable[[dict], None]) -> Callable[[dict], dict]:
    def apply(m: dict) -> dict:
        change(m)
        return m

    return apply


def setitem(path: str, value: object) -> Callable[[dict], dict]:
    *parents, last = path.split(".")

    def change(m: dict) -> None:
        for key in parents:
            m = m[key]
        m[last] = value

    return edit(change)


def delitem(path: str) -> Callable[[dict], dict]:
    *parents, last = path.split(".")

    def change(m: dict) -> None:
        for key in parents:
            m = m[key]
        del m[last]

    return edit(change)


RAW = {  # manifest.json bytes that are not a JSON object at all
    "random bytes": np.random.default_rng(0).bytes(300),
    "not UTF-8": b'{"format": "lookalike-index", "dim": "\xff\xfe"}',
    "not JSON": b"{not json",
    "truncated": b'{"format": "lookalike-index", "format_version": 2, "descr',
}

DAMAGE = [
    ("dim", setitem("dim", "abc"), "dim must be an integer >= 1, got 'abc'"),
    ("dim", setitem("dim", 0), "dim must be an integer >= 1"),
    ("dim", setitem("dim", True), "dim must be an integer >= 1, got True"),
    ("descriptor", setitem("descriptor", [1]), "descriptor must be an object"),
    ("descriptor", setitem("descriptor.model", 5), "descriptor.model must be a string"),
    ("model", setitem("model.name", "resnet50"), "model disagrees with the descriptor"),
    ("model", setitem("model.weights_hash", 5), "model.weights_hash must be a string"),
    ("index", setitem("index.backend", "annoy"), "unknown vector backend 'annoy'"),
    ("index", setitem("index.factory", "IVFbogus"), "invalid index factory 'IVFbogus'"),
    ("index", setitem("index.backend", "numpy"), None),  # valid: numpy Flat
    ("index", edit(lambda m: m["index"].update(backend="numpy", factory="HNSW32")), "exactly"),
    ("index", setitem("index.nprobe", "x"), "nprobe must be an integer"),
    ("checkpoint", setitem("checkpoint.file", "../x"), "checkpoint file name"),
    ("checkpoint", setitem("checkpoint.file", "../faiss-1.index"), "checkpoint file name"),
    ("checkpoint", setitem("checkpoint.file", "/etc/faiss-1.index"), "checkpoint file name"),
    ("checkpoint", setitem("checkpoint.file", "."), "checkpoint file name"),
    ("checkpoint", setitem("checkpoint.file", ""), "checkpoint file name"),
    ("checkpoint", setitem("checkpoint.file", 7), "checkpoint.file must be a string"),
    ("checkpoint", setitem("checkpoint.seq", -1), "checkpoint.seq must be an integer >= 0"),
    ("checkpoint", setitem("checkpoint.fallback", "no"), "checkpoint.fallback must be true"),
    ("whitening", setitem("whitening", [1]), "whitening must be an object"),
    ("whitening", setitem("whitening.learned", "yes"), "whitening.learned must be true"),
    ("whitening", setitem("whitening.dim_out", 0), "whitening.dim_out must be an integer"),
    ("whitening", setitem("whitening.epoch", -2), "whitening.epoch must be an integer"),
    ("query", setitem("query.rotations", [0, 45]), "multiples of 90"),
    ("query", setitem("query.rotations", "up"), "query.rotations must be a list"),
    ("query", setitem("query.rotations", []), "query.rotations must be a list"),
    ("query", setitem("query.rotation_penalty", float("nan")), "finite number"),
    ("query", setitem("query", None), "query must be an object"),
    ("local", setitem("local", "aliked"), "local must be an object"),
    ("local", setitem("local", {"features": "bogus"}), "unknown local features 'bogus'"),
    ("local", setitem("local", {"colour": 1}), "unknown verify settings"),
    ("dba", setitem("dba", {"k": 0, "alpha": 1.0}), "dba.k must be an integer >= 1"),
    ("dba", setitem("dba", {"k": 3}), "no 'dba.alpha' entry"),
    ("versions", setitem("versions", ["faiss"]), "versions must be an object"),
    ("created", setitem("created", 5), "created must be a string"),
    ("format_version", setitem("format_version", "2"), "no valid format_version"),
    ("format_version", setitem("format_version", 0), "no valid format_version"),
] + [
    (key, delitem(key), f"no {key!r} entry")
    for key in ("descriptor", "dim", "index", "checkpoint", "model", "query")
]


def assert_one_line_refusal(
    root: Path, fragment: str, hint: str = "rebuild it with", manifest_only: bool = True
) -> None:
    """Reading the manifest (when ``manifest_only``: it alone is damaged) and opening the
    index, for reading and for writing, each raise one line with ``fragment`` and ``hint``."""
    calls = [IndexStore.open, lambda r: IndexStore.open(r, writable=True)]
    for call in [read_manifest, *calls] if manifest_only else calls:
        with pytest.raises(IndexStateError) as info:
            call(root)
        message = str(info.value)
        assert "\n" not in message and fragment in message and hint in message, message


@pytest.mark.parametrize("name", RAW)
def test_unreadable_manifest_is_one_line(root: Path, name: str) -> None:
    fill(root, n=5)
    (root / "manifest.json").write_bytes(RAW[name])
    fragment = "UnicodeDecodeError" if name == "not UTF-8" else "is unreadable"
    assert_one_line_refusal(root, fragment)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [pytest.param(change, fragment, id=f"{key}: {fragment}") for key, change, fragment in DAMAGE],
)
def test_damaged_field_is_one_line(root: Path, damage, fragment: str | None) -> None:
    fill(root, n=5)
    m = manifest_json(root)
    m["dba"] = {"k": 3, "alpha": 2.0}  # so that the dba section is validated too
    (root / "manifest.json").write_text(json.dumps(damage(m)))
    if fragment is None:  # the control: the same edit path, a valid value
        assert read_manifest(root).index.backend == "numpy"
        return
    assert_one_line_refusal(root, fragment)
    with pytest.raises(IndexStateError) as info:
        read_manifest(root)
    assert str(info.value).startswith(f"{root / 'manifest.json'} ")  # names the file


def test_newer_format_asks_for_a_newer_lookalike(root: Path) -> None:
    fill(root, n=5)
    (root / "manifest.json").write_text(json.dumps({**manifest_json(root), "format_version": 3}))
    assert_one_line_refusal(root, "format version 3", hint="upgrade lookalike")


# -- the round trip ------------------------------------------------------------------------


def test_write_read_round_trip_keeps_every_field(tmp_path: Path) -> None:
    descriptor = {"model": "resnet50", "weights": "/models/r50.pth", "pooling": "gem", "p": 3.0}
    manifest = Manifest(
        descriptor=descriptor,
        dim=2048,
        model=ModelIdentity("resnet50", "/models/r50.pth", "sha256:0123"),
        index=IndexConf(factory="HNSW32", nprobe=3, ef_search=40, backend="faiss"),
        query=QueryDefaults((0, 90, 270), 0.05),
        whitening=WhiteningState(True, 512, 4),
        checkpoint=CheckpointRef("faiss-12.index", 12, True),
        local=VerifyConf(features="rootsift", max_keypoints=100, weights=None, budget=7),
        dba=DBASettings(7, 2.5),
        created="2026-01-02T03:04:05.000+00:00",
    )
    bare = Manifest(descriptor={}, dim=1, model=ModelIdentity(None))
    for f in dataclasses.fields(Manifest):  # so that a field lost on the way would show
        if f.name not in ("updated", "versions", "format_version"):
            assert getattr(manifest, f.name) != getattr(bare, f.name), f.name
    written = write_manifest(tmp_path, manifest)
    assert written.updated and set(written.versions) == {"lookalike", "faiss", "numpy", "python"}
    assert written == manifest.replace(updated=written.updated, versions=written.versions)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no scratch file left
    assert read_manifest(tmp_path) == written
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 2
    again = write_manifest(tmp_path, read_manifest(tmp_path).replace(local=None, dba=None))
    assert read_manifest(tmp_path) == again and again.local is None and again.dba is None


def test_numpy_index_round_trips(root: Path) -> None:
    fill(root, IndexConf(backend="numpy"), n=5)
    manifest = read_manifest(root)
    assert manifest.index == IndexConf(backend="numpy") and manifest.format_version == 2
    assert manifest.checkpoint == CheckpointRef("numpy-5.index", 5, False, manifest.checkpoint.sha)
    assert len(manifest.checkpoint.sha) == 64  # its blake2b-256 digest, hex


# -- format 1 --------------------------------------------------------------------------------


def test_format_1_reads_without_changing_a_file(root: Path) -> None:
    x, ids = make_v1(root)
    before = files(root)
    with IndexStore.open(root) as reader:
        manifest = reader.manifest
        assert manifest.format_version == 1
        assert manifest.query == QueryDefaults((0, 90, 180, 270), 0.02)
        assert manifest.local == V1_LOCAL
        assert manifest.index == IndexConf(factory="Flat", nprobe=8, ef_search=100)
        assert manifest.model == ModelIdentity("efficientnet_lite0", None, None)
        assert manifest.dba is None and manifest.checkpoint.file == "faiss-50.index"
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)
        reader.check_weights("sha256:abc")  # unknown hash: nothing to compare, nothing written
        assert reader.refresh_if_changed() is False
        reader.refresh()
        assert reader.manifest.local == V1_LOCAL and reader.manifest.format_version == 1
        assert len(reader.vector_source().live().ids) == 50
    assert files(root) == before  # bytes and mtimes, manifest.json and meta.sqlite included
    assert read_manifest(root).format_version == 1  # not upgraded on disk


def test_format_1_is_upgraded_in_place_by_a_writer(root: Path) -> None:
    x, ids = make_v1(root)
    checkpoint = manifest_json(root)["checkpoint"]
    with IndexStore.open(root, writable=True) as writer:
        assert writer.manifest.format_version == 2
        assert writer.manifest.query == QueryDefaults((0, 90, 180, 270), 0.02)
        assert writer.manifest.local == V1_LOCAL
        np.testing.assert_array_equal(writer.search(x, 1)[1][:, 0], ids)
    on_disk = manifest_json(root)
    assert on_disk["format_version"] == 2 and on_disk["checkpoint"] == checkpoint
    assert on_disk["query"] == {
        "rotations": [0, 90, 180, 270],
        "rotation_penalty": 0.02,
        "crops": [],
        "crop_penalty": 0.05,
    }
    assert on_disk["local"] == V1_LOCAL.to_dict() and on_disk["dba"] is None
    assert on_disk["index"] == {"backend": "faiss", "factory": "Flat", "nprobe": 8,
                                "ef_search": 100}  # fmt: skip
    assert on_disk["model"] == {"name": "efficientnet_lite0", "weights": None,
                                "weights_hash": None}  # fmt: skip
    assert kv(root, "settings") is None  # the format 1 entry is gone
    assert not list(root.glob("*.tmp"))
    upgraded = files(root, skip=("lock",))  # the lock file holds each writer's pid
    with IndexStore.open(root, writable=True) as writer:  # a second open changes nothing
        assert writer.manifest == read_manifest(root)
    assert files(root, skip=("lock",)) == upgraded
    with IndexStore.open(root) as reader:
        assert reader.manifest.local == V1_LOCAL and reader.manifest.format_version == 2
        np.testing.assert_array_equal(reader.search(x, 1)[1][:, 0], ids)


def test_failed_upgrade_leaves_format_1(root: Path, monkeypatch) -> None:
    import lookalike.index.upgrade as upgrade

    make_v1(root)
    before = files(root)

    def fail(root: Path, manifest: Manifest) -> Manifest:
        raise OSError("disk full")

    monkeypatch.setattr(upgrade, "write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        IndexStore.open(root, writable=True)
    monkeypatch.undo()
    assert files(root)["manifest.json"] == before["manifest.json"]
    assert json.loads(kv(root, "settings")) == V1_SETTINGS
    with IndexStore.open(root, writable=True) as writer:  # the lock was released: retry
        assert writer.manifest.local == V1_LOCAL
    assert kv(root, "settings") is None


def test_entry_left_by_a_crashed_upgrade_is_ignored_then_deleted(root: Path) -> None:
    make_v1(root)
    with IndexStore.open(root) as reader:  # what the crashed writer had written
        write_manifest(root, reader.manifest)
    set_kv(root, "settings", json.dumps({"query_rotations": [0, 180], "local": None}))
    with IndexStore.open(root) as reader:
        assert reader.manifest.format_version == 2  # format 2 reads its own sections only
        assert reader.manifest.query.rotations == (0, 90, 180, 270)
        assert reader.manifest.local == V1_LOCAL
    with IndexStore.open(root, writable=True):
        pass
    assert kv(root, "settings") is None


def test_reader_recording_into_format_1_upgrades_it(root: Path) -> None:
    make_v1(root)
    with IndexStore.open(root) as reader, reader.try_writer() as ok:
        assert ok
        reader.update_manifest(dba=DBASettings(4, 3.0))
    on_disk = read_manifest(root)
    assert on_disk.format_version == 2 and on_disk.dba == DBASettings(4, 3.0)
    assert on_disk.local == V1_LOCAL and kv(root, "settings") is None


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ("{not json", "unreadable settings"),
        ("[1, 2]", "unreadable settings"),
        ("null", "unreadable settings"),
        ('"text"', "unreadable settings"),
        ('{"query_rotations": [0, 45]}', "multiples of 90"),
        ('{"query_rotations": 90}', "cannot be upgraded"),
        ('{"rotation_penalty": "high"}', "finite number"),
        ('{"local": {"features": "bogus"}}', "unknown local features"),
        ('{"local": ["sift"]}', "local must be an object"),
    ],
)
def test_unreadable_format_1_settings_are_refused(root: Path, settings: str, fragment: str) -> None:
    make_v1(root, settings)
    before = files(root)
    assert read_manifest(root).format_version == 1  # the manifest itself is fine
    assert_one_line_refusal(root, fragment, manifest_only=False)
    assert files(root)["manifest.json"] == before["manifest.json"]
    assert kv(root, "settings") == settings  # nothing upgraded, nothing deleted


def test_format_1_without_settings_takes_the_defaults(root: Path) -> None:
    make_v1(root, settings=None)
    with IndexStore.open(root) as reader:
        assert reader.manifest.query == QueryDefaults() and reader.manifest.local is None


# -- the weights hash ------------------------------------------------------------------------


def test_check_weights_compares_content_hashes(root: Path) -> None:
    with IndexStore.create(root, DESCRIPTOR, D, weights_hash="sha256:aaa") as writer:
        writer.add([], np.empty((0, D), np.float32))
        writer.check_weights("sha256:aaa")
        with pytest.raises(IndexStateError) as info:
            writer.check_weights("sha256:bbb")
    message = str(info.value)
    assert "sha256:aaa" in message and "sha256:bbb" in message and "\n" not in message
    assert "efficientnet_lite0" in message and "rebuild it with" in message
    assert read_manifest(root).model.weights_hash == "sha256:aaa"  # a mismatch records nothing
    with IndexStore.open(root) as reader:
        reader.check_weights("sha256:aaa")
        with pytest.raises(IndexStateError, match="sha256:bbb"):
            reader.check_weights("sha256:bbb")
    with pytest.raises(IndexStateError, match=r"content hash sha256:ccc, the index has sha256:a"):
        IndexStore.create(root, DESCRIPTOR, D, exist_ok=True, weights_hash="sha256:ccc")
    with IndexStore.create(root, DESCRIPTOR, D, exist_ok=True, weights_hash="sha256:aaa"):
        pass


def test_writer_records_the_hash_of_a_format_1_index(root: Path) -> None:
    x, ids = make_v1(root)
    with IndexStore.open(root) as reader:  # a reader records nothing
        reader.check_weights("sha256:new")
        assert reader.manifest.model.weights_hash is None
    with IndexStore.open(root, writable=True) as writer:
        assert writer.manifest.model.weights_hash is None
        writer.check_weights("sha256:new")
        assert writer.manifest.model.weights_hash == "sha256:new"
        writer.check_weights("sha256:new")
    assert read_manifest(root).model == ModelIdentity("efficientnet_lite0", None, "sha256:new")
    with IndexStore.open(root) as reader:
        with pytest.raises(IndexStateError, match="sha256:other"):
            reader.check_weights("sha256:other")
        np.testing.assert_array_equal(reader.search(x[:3], 1)[1][:, 0], ids[:3])
