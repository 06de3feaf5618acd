"""LocalFeatureStore: round trips per encoding, removal, reopening, crashes, refusals, and
stores of format 1 (moved into ``local.sqlite`` where the directory is writable)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError, IndexStateError
from lookalike.local import (
    DESCRIPTORS,
    IMAGE_SIZE,
    KEYPOINTS,
    SCORES,
    LocalFeatureStore,
    default_local_settings,
)
from lookalike.local.features import root_sift
from lookalike.local.store import (
    DATA_NAME,
    DB_NAME,
    FORMAT_VERSION,
    LOCAL_DIR,
    META_KEY,
    OLD_MANIFEST_NAME,
    has_local_store,
    stored_extractor,
)


def fake_features(name: str, n: int, seed: int = 0, size: tuple[int, int] = (640, 480)) -> dict:
    """Features shaped like extractor ``name``'s, with random values."""
    rng = np.random.default_rng(seed)
    settings = default_local_settings(name)
    dim = settings["dim"]
    if settings["binary"]:
        desc = rng.integers(0, 256, (n, dim), dtype=np.uint8)
    elif name == "sift":
        desc = rng.integers(0, 180, (n, dim)).astype(np.float32)
    elif name == "rootsift":
        desc = root_sift(rng.integers(0, 180, (n, dim)).astype(np.float32))
    else:
        desc = rng.standard_normal((n, dim)).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    w, h = size
    return {
        KEYPOINTS: (rng.uniform(0, 1, (n, 2)) * [w - 1, h - 1]).astype(np.float32),
        DESCRIPTORS: desc,
        SCORES: np.sort(rng.uniform(0, 1, n).astype(np.float32))[::-1].copy(),
        IMAGE_SIZE: size,
    }


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    path = tmp_path / "index"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("name", "quantize", "desc_tol", "dtype"),
    [
        ("sift", False, 0.0, np.float32),  # integer-valued: uint8 is lossless
        ("rootsift", False, 2e-3, np.float32),  # float16
        ("rootsift", True, 1.0 / 1024 + 1e-6, np.float32),  # uint8, step 1/512
        ("orb", False, 0.0, np.uint8),
        ("akaze", False, 0.0, np.uint8),
        ("aliked", False, 2e-3, np.float32),
    ],
)
def test_round_trip_per_encoding(
    index_dir: Path, name: str, quantize: bool, desc_tol: float, dtype: type
) -> None:
    feats = fake_features(name, 300, size=(4000, 3000))
    with LocalFeatureStore(index_dir, name, quantize=quantize) as store:
        store.put(7, feats)
        got = store.get(7)
    assert got is not None and got[IMAGE_SIZE] == (4000, 3000)
    assert got[KEYPOINTS].dtype == np.float32 and got[DESCRIPTORS].dtype == dtype
    # uint16 keypoints relative to the size: half a step of 4000 / 65535 px
    np.testing.assert_allclose(got[KEYPOINTS], feats[KEYPOINTS], atol=4000 / 65535 / 2 + 1e-3)
    diff = np.abs(got[DESCRIPTORS].astype(np.float64) - feats[DESCRIPTORS].astype(np.float64))
    assert diff.max() <= desc_tol
    np.testing.assert_allclose(got[SCORES], feats[SCORES], rtol=1e-3)
    # compact: 4 + 2 bytes per keypoint, one or two bytes per descriptor value
    per_kpt = store.record_bytes(300) / 300
    itemsize = 2 if (name == "aliked" or (name == "rootsift" and not quantize)) else 1
    assert per_kpt <= 6 + itemsize * feats[DESCRIPTORS].shape[1] + 1


def test_many_missing_tags_and_prefix(index_dir: Path) -> None:
    store = LocalFeatureStore(index_dir, "rootsift")
    store.put_many([(1, fake_features("rootsift", 10, 1)), (2, fake_features("rootsift", 20, 2))],
                   tags=["hash-a", None])  # fmt: skip
    got = store.get_many([2, 99, 1, 2])
    assert [None if g is None else len(g[KEYPOINTS]) for g in got] == [20, None, 10, 20]
    # a record whose tag differs from the expected one (the image changed) counts as missing
    assert store.get(1, tag="hash-b") is None
    assert store.get(1, tag="hash-a") is not None and store.get(2, tag="anything") is None
    # records are stored best first: the first k are the top-k scores
    top = store.get(2, max_keypoints=5)
    full = store.get(2)
    assert len(top[KEYPOINTS]) == 5
    np.testing.assert_array_equal(top[DESCRIPTORS], full[DESCRIPTORS][:5])
    np.testing.assert_array_equal(top[KEYPOINTS], full[KEYPOINTS][:5])
    assert store.get_many([]) == []
    with pytest.raises(ValueError, match="tags"):
        store.get_many([1, 2], tags=["x"])
    store.close()


def test_cap_keeps_best_scores_sorted(index_dir: Path) -> None:
    settings = {**default_local_settings("orb"), "max_keypoints": 16}
    store = LocalFeatureStore(index_dir, "orb", settings)
    feats = fake_features("orb", 50, 3)
    rng = np.random.default_rng(0)
    feats[SCORES] = rng.permutation(50).astype(np.float32)  # unsorted input
    store.put(1, feats)
    got = store.get(1)
    order = np.argsort(-feats[SCORES])[:16]
    np.testing.assert_array_equal(got[DESCRIPTORS], feats[DESCRIPTORS][order])
    assert np.all(np.diff(got[SCORES]) <= 0)


def test_empty_features_and_replace_and_remove(index_dir: Path) -> None:
    store = LocalFeatureStore(index_dir, "sift")
    empty = fake_features("sift", 0)
    store.put(1, empty)
    got = store.get(1)
    assert got[KEYPOINTS].shape == (0, 2) and got[DESCRIPTORS].shape == (0, 128)
    store.put(1, fake_features("sift", 5))  # replace
    store.put(2, fake_features("sift", 6))
    assert len(store.get(1)[KEYPOINTS]) == 5 and len(store) == 2
    assert 1 in store and 3 not in store and "1" not in store
    assert store.remove([1, 42]) == 1
    assert 1 not in store and store.get(1) is None and store.ids().tolist() == [2]
    store.close()
    with pytest.raises(IndexStateError, match="closed"):
        store.get(2)


def test_reopen_and_two_handles(index_dir: Path) -> None:
    writer = LocalFeatureStore(index_dir, "aliked")
    reader = LocalFeatureStore(index_dir, "aliked")
    feats = fake_features("aliked", 30)
    writer.put(5, feats)
    # a second handle (another process, typically) sees the commit, and later growth
    assert reader.get(5) is not None
    writer.put(6, fake_features("aliked", 40, 1))
    assert len(reader.get(6)[KEYPOINTS]) == 40
    writer.close()
    reader.close()
    again = LocalFeatureStore(index_dir, "aliked", create=False)
    np.testing.assert_allclose(again.get(5)[DESCRIPTORS], feats[DESCRIPTORS], atol=2e-3)
    again.close()


def test_garbage_past_the_end_is_ignored_and_overwritten(index_dir: Path) -> None:
    store = LocalFeatureStore(index_dir, "sift")
    a = fake_features("sift", 12, 1)
    store.put(1, a)
    store.close()
    data = index_dir / LOCAL_DIR / DATA_NAME
    size = data.stat().st_size
    with open(data, "ab") as f:  # a writer killed after appending, before its commit
        f.write(b"\xff" * 1000)
    store = LocalFeatureStore(index_dir, "sift")
    assert store.ids().tolist() == [1]
    np.testing.assert_array_equal(store.get(1)[DESCRIPTORS], a[DESCRIPTORS])
    b = fake_features("sift", 8, 2)
    store.put(2, b)  # written over the garbage, which is cut
    np.testing.assert_array_equal(store.get(2)[DESCRIPTORS], b[DESCRIPTORS])
    assert data.stat().st_size == size + store.record_bytes(8)
    store.close()


def test_truncated_data_file_is_reported(index_dir: Path) -> None:
    store = LocalFeatureStore(index_dir, "sift")
    store.put(1, fake_features("sift", 12))
    store.close()
    data = index_dir / LOCAL_DIR / DATA_NAME
    with open(data, "r+b") as f:
        f.truncate(100)
    store = LocalFeatureStore(index_dir, "sift")
    with pytest.raises(IndexStateError, match="damaged"):
        store.get(1)
    store.close()


@pytest.mark.parametrize("damage", ["page", "schema"])
def test_a_damaged_database_is_one_error_naming_it(index_dir: Path, damage: str) -> None:
    """Garbled pages (NULL offsets, bad tags) or a garbled schema: refused on opening."""
    store = LocalFeatureStore(index_dir, "sift")
    store.put_many([(i, fake_features("sift", 12, seed=i)) for i in range(1, 40)])
    store.close()
    db = index_dir / LOCAL_DIR / DB_NAME
    data = bytearray(db.read_bytes())
    if damage == "page":  # the b-tree header of every page after the first
        for page in range(4096, len(data), 4096):
            data[page : page + 8] = b"\xff" * 8
    else:  # the table definitions on page 1
        at = data.index(b"CREATE TABLE")
        data[at + 20 : at + 60] = b"\xb6" * 40
    db.write_bytes(bytes(data))
    with pytest.raises(IndexStateError, match=f"{DB_NAME}.*damaged"):
        LocalFeatureStore(index_dir, "sift").close()


def test_compact(index_dir: Path) -> None:
    store = LocalFeatureStore(index_dir, "orb")
    feats = {i: fake_features("orb", 10 + i, i) for i in range(6)}
    store.put_many(feats.items())
    store.put(0, feats[5])  # replaced: its old record is dead
    store.remove([1, 2])
    before = store.stats()
    assert before["live_bytes"] < before["file_bytes"]
    store.compact()
    after = store.stats()
    assert after["live_bytes"] == after["file_bytes"] == before["live_bytes"]
    files = sorted(p.name for p in (index_dir / LOCAL_DIR).glob("features*.bin"))
    assert files == ["features.1.bin"]
    for i, expected in ((0, feats[5]), (3, feats[3]), (4, feats[4]), (5, feats[5])):
        np.testing.assert_array_equal(store.get(i)[DESCRIPTORS], expected[DESCRIPTORS])
    store.compact()  # nothing dead: no new file
    assert sorted(p.name for p in (index_dir / LOCAL_DIR).glob("features*.bin")) == files
    store.put(9, feats[1])  # appends to the compacted file
    store.close()
    reopened = LocalFeatureStore(index_dir, "orb")
    assert reopened.ids().tolist() == [0, 3, 4, 5, 9]
    np.testing.assert_array_equal(reopened.get(9)[DESCRIPTORS], feats[1][DESCRIPTORS])
    reopened.close()


def test_refuses_another_extractor_or_settings(index_dir: Path) -> None:
    LocalFeatureStore(index_dir, "sift").close()
    with pytest.raises(IndexStateError, match=r"holds 'sift' local features, not 'aliked'"):
        LocalFeatureStore(index_dir, "aliked")
    other = {**default_local_settings("sift"), "max_keypoints": 512}
    with pytest.raises(IndexStateError, match="max_keypoints=1024"):
        LocalFeatureStore(index_dir, "sift", other)
    with pytest.raises(ConfigError, match="rootsift"):
        LocalFeatureStore(index_dir, "surf")
    with pytest.raises(IndexStateError, match="quantize"):
        LocalFeatureStore(index_dir, "sift", quantize=True)
    LocalFeatureStore(index_dir, "sift", default_local_settings("sift")).close()  # same: fine


def test_missing_and_bad_input(tmp_path: Path, index_dir: Path) -> None:
    with pytest.raises(IndexStateError, match="--local sift"):
        LocalFeatureStore(index_dir, "sift", create=False)
    with pytest.raises(IndexStateError, match="does not exist"):
        LocalFeatureStore(tmp_path / "nowhere", "sift")
    with pytest.raises(ConfigError, match="float16"):
        LocalFeatureStore(index_dir, "aliked", quantize=True)
    store = LocalFeatureStore(index_dir, "rootsift")
    good = fake_features("rootsift", 4)
    with pytest.raises(ValueError, match=r"\(4, 128\)"):
        store.put(1, {**good, DESCRIPTORS: good[DESCRIPTORS][:, :64]})
    with pytest.raises(ValueError, match="float"):
        store.put(1, {**good, DESCRIPTORS: good[DESCRIPTORS].astype(np.uint8)})
    with pytest.raises(ValueError, match="image_size"):
        store.put(1, {k: v for k, v in good.items() if k != IMAGE_SIZE})
    with pytest.raises(ValueError, match="twice"):
        store.put_many([(1, good), (1, good)])
    assert len(store) == 0  # nothing half-written
    store.close()


def test_creation_is_atomic_and_leaves_no_scratch(index_dir: Path) -> None:
    (index_dir / LOCAL_DIR).mkdir()  # an empty folder is taken over
    LocalFeatureStore(index_dir, "orb").close()
    (index_dir / "other").mkdir()
    (index_dir / "other" / LOCAL_DIR).mkdir()
    (index_dir / "other" / LOCAL_DIR / "notes.txt").write_text("mine")
    with pytest.raises(IndexStateError, match="not a local feature store"):
        LocalFeatureStore(index_dir / "other", "orb")
    assert sorted(p.name for p in index_dir.iterdir()) == [LOCAL_DIR, "other"]
    assert sorted(p.name for p in (index_dir / "other").iterdir()) == [LOCAL_DIR]


def test_losing_a_creation_race_opens_the_winner(index_dir: Path, monkeypatch) -> None:
    import lookalike.local.layout as store_module

    winner = {}
    real_rename = store_module.os.rename

    def rename_after_another_process(src, dst):
        if not winner:  # another process finishes its creation first
            monkeypatch.setattr(store_module.os, "rename", real_rename)
            winner["store"] = LocalFeatureStore(index_dir, "sift")
            winner["store"].put(1, fake_features("sift", 3))
            monkeypatch.setattr(store_module.os, "rename", rename_after_another_process)
        return real_rename(src, dst)

    monkeypatch.setattr(store_module.os, "rename", rename_after_another_process)
    loser = LocalFeatureStore(index_dir, "sift")
    assert loser.ids().tolist() == [1]  # the winner's store, with its data
    assert sorted(p.name for p in index_dir.iterdir()) == [LOCAL_DIR]
    loser.close()
    winner["store"].close()


# -- format 1 (local/manifest.json beside local.sqlite, as commit 0b54257 wrote it) ----------


def write_format1_store(index_dir: Path, name: str, items: dict[int, dict]) -> Path:
    """A store laid out as format 1 wrote it: ``manifest.json`` (indent 2) describing the
    records, ``local.sqlite`` with the features table and a kv of data file, data end and
    generation only, ``features.bin`` with the records back to back."""
    import json
    import sqlite3

    from lookalike.local.encoding import RecordCodec, library_versions, storage_encoding

    root = index_dir / LOCAL_DIR
    root.mkdir()
    settings = default_local_settings(name)
    storage = storage_encoding(settings, False)
    codec = RecordCodec(
        name, settings["dim"], settings["binary"], settings["max_keypoints"],
        np.dtype(storage["descriptors"]), storage["scale"],
    )  # fmt: skip
    rows, data = [], b""
    for image_id, feats in items.items():
        record, n, w, h = codec.encode(feats)
        rows.append((image_id, len(data), n, w, h, f"hash-{image_id}"))
        data += record
    (root / DATA_NAME).write_bytes(data)
    conn = sqlite3.connect(root / DB_NAME, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        "CREATE TABLE features (id INTEGER PRIMARY KEY, offset INTEGER NOT NULL, n INTEGER "
        "NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, tag TEXT);"
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT);"
    )
    kv = (("data_file", DATA_NAME), ("data_end", str(len(data))), ("gen", "0"))
    conn.executemany("INSERT INTO kv(key, value) VALUES (?, ?)", kv)
    conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    manifest = {
        "format": "lookalike-local-features",
        "format_version": 1,
        "extractor": settings,
        "storage": {**storage, "keypoints": "uint16", "scores": "float16"},
        "quantize": False,
        "versions": library_versions(),
    }
    (root / OLD_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def kv_meta(root: Path) -> str | None:
    import sqlite3

    conn = sqlite3.connect(f"file:{root / DB_NAME}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (META_KEY,)).fetchone()
    finally:
        conn.close()
    return None if row is None else row[0]


@pytest.fixture
def format1(index_dir: Path) -> tuple[Path, dict[int, dict]]:
    feats = {3: fake_features("sift", 12, 3), 8: fake_features("sift", 20, 8, size=(300, 200))}
    return write_format1_store(index_dir, "sift", feats), feats


def test_format1_store_is_read_and_moved_into_sqlite(index_dir: Path, format1) -> None:
    import json

    root, feats = format1
    assert has_local_store(index_dir) and kv_meta(root) is None
    assert stored_extractor(index_dir) == default_local_settings("sift")
    assert (root / OLD_MANIFEST_NAME).exists()  # reading the settings upgrades nothing
    with LocalFeatureStore(index_dir, "sift", default_local_settings("sift")) as store:
        assert store.manifest["format_version"] == FORMAT_VERSION == 2
        assert store.ids().tolist() == [3, 8] and store.tags() == {3: "hash-3", 8: "hash-8"}
        for i, expected in feats.items():
            got = store.get(i, tag=f"hash-{i}")
            np.testing.assert_array_equal(got[DESCRIPTORS], expected[DESCRIPTORS])
            assert got[IMAGE_SIZE] == expected[IMAGE_SIZE]
    assert not (root / OLD_MANIFEST_NAME).exists()
    meta = json.loads(kv_meta(root))
    assert meta["format_version"] == 2 and meta["extractor"] == default_local_settings("sift")
    assert meta["storage"] == {"descriptors": "uint8", "scale": 1.0, "keypoints": "uint16",
                               "scores": "float16"}  # fmt: skip
    # reopened from local.sqlite alone, still refusing other settings
    assert stored_extractor(index_dir) == default_local_settings("sift")
    with LocalFeatureStore(index_dir, "sift", create=False) as store:
        store.put(9, feats[3])
        assert store.ids().tolist() == [3, 8, 9]
    with pytest.raises(IndexStateError, match="max_keypoints=1024"):
        LocalFeatureStore(index_dir, "sift", {**default_local_settings("sift"), "max_keypoints": 5})


def test_format1_store_in_a_read_only_directory_is_read_not_written(
    index_dir: Path, format1, monkeypatch
) -> None:
    import hashlib
    import sqlite3

    from lookalike.storage import Database

    root, feats = format1

    def digest() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}

    before = digest()

    @contextlib.contextmanager
    def refused(self):
        raise sqlite3.OperationalError("attempt to write a readonly database")
        yield  # pragma: no cover

    def no_unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Database, "write", refused)  # what a read-only directory does
    monkeypatch.setattr(Path, "unlink", no_unlink)
    with LocalFeatureStore(index_dir, "sift", create=False) as store:
        assert store.manifest["format_version"] == 1  # read from manifest.json
        assert store.ids().tolist() == [3, 8]
        np.testing.assert_array_equal(store.get(8)[DESCRIPTORS], feats[8][DESCRIPTORS])
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.put(1, feats[3])
    assert digest() == before and kv_meta(root) is None
    monkeypatch.undo()
    with LocalFeatureStore(index_dir, "sift", create=False) as store:  # writable again
        assert store.manifest["format_version"] == 2
    assert kv_meta(root) is not None and not (root / OLD_MANIFEST_NAME).exists()


def test_an_upgrade_interrupted_before_the_old_file_went_is_finished(
    index_dir: Path, format1, monkeypatch
) -> None:
    root, _ = format1

    def no_unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", no_unlink)
        LocalFeatureStore(index_dir, "sift").close()
    assert kv_meta(root) is not None and (root / OLD_MANIFEST_NAME).exists()
    with LocalFeatureStore(index_dir, "sift") as store:
        assert store.manifest["format_version"] == 2 and len(store) == 2
    assert not (root / OLD_MANIFEST_NAME).exists()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("no-sqlite", "local.sqlite is missing"),
        ("bad-json", "cannot read what"),
        ("not-ours", "not a lookalike local feature store"),
        ("newer", "upgrade lookalike"),
        ("no-extractor", "names no local extractor"),
    ],
)
def test_a_damaged_format1_store_is_refused(index_dir: Path, format1, damage, words) -> None:
    import json

    root, _ = format1
    old = root / OLD_MANIFEST_NAME
    meta = json.loads(old.read_text())
    if damage == "no-sqlite":
        (root / DB_NAME).unlink()
    elif damage == "bad-json":
        old.write_text("{not json")
    else:
        changes = {"not-ours": {"format": "other"}, "newer": {"format_version": 3},
                   "no-extractor": {"extractor": None}}[damage]  # fmt: skip
        old.write_text(json.dumps({**meta, **changes}))
    with pytest.raises(IndexStateError, match=words):
        LocalFeatureStore(index_dir, "sift", create=False)
    if damage != "no-sqlite":
        with pytest.raises(IndexStateError, match=words):
            stored_extractor(index_dir)
        assert old.exists()  # nothing moved
