"""The demo: sample images, edited queries, and the end-to-end run (slow)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike import demo
from lookalike.errors import ConfigError, IndexStateError
from lookalike.viz import THUMBS_DIR

pytest_plugins = ("_fixtures",)


def test_ground_truth() -> None:
    assert demo.original_of("/x/queries/chelsea__crop.jpg") == "chelsea"
    assert demo.original_of("hubble_deep_field__rot90.jpg") == "hubble_deep_field"
    assert demo.original_of("plain.jpg") == "plain"
    assert demo.is_match("q/coffee__jpeg30.jpg", "/c/collection/coffee.jpg")
    assert not demo.is_match("q/coffee__jpeg30.jpg", "/c/collection/coins.jpg")
    assert not demo.is_match("q/coffee__jpeg30.jpg", "/c/collection/coffee__jpeg30.jpg")


@pytest.mark.parametrize(
    "arr",
    [
        np.array([[True, False], [False, True]]),
        np.array([[0, 255], [128, 7]], np.uint8),
        np.zeros((2, 2, 4), np.uint8),
        np.full((2, 2, 3), 0.5, np.float64),
    ],
    ids=["bool", "gray", "rgba", "float"],
)
def test_to_rgb(arr: np.ndarray) -> None:
    img = demo._to_rgb(arr)
    assert img.mode == "RGB" and img.size == (2, 2)
    if arr.dtype == bool:
        assert np.asarray(img)[0, 0].tolist() == [255, 255, 255]
    if arr.dtype == np.float64:
        assert np.asarray(img)[0, 0].tolist() == [127, 127, 127]


def test_transforms() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (100, 200, 3), np.uint8))
    sizes = {name: edit(img).size for name, (edit, _) in demo.TRANSFORMS.items()}
    assert sizes["crop"] == (140, 75)
    assert sizes["rot90"] == (100, 200)
    assert sizes["scale50"] == (100, 50)
    assert sizes["colour"] == sizes["jpeg30"] == (200, 100)
    assert sizes["rot12"][0] > 200 and sizes["rot12"][1] > 100  # canvas grows
    assert demo.TRANSFORMS["jpeg30"][1] == 30
    assert not np.array_equal(np.asarray(demo._colour(img)), np.asarray(img))


def test_sample_images_load_offline() -> None:
    images = demo.sample_images()
    assert {"astronaut", "camera", "chelsea", "coffee", "china", "flower"} <= set(images)
    assert len(images) >= 12
    assert all(img.mode == "RGB" for img in images.values())


def test_make_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    fake = {n: Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)) for n in "abcde"}
    monkeypatch.setattr(demo, "sample_images", lambda: fake)
    stale = tmp_path / "queries" / "old__crop.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")

    coll, queries = demo.make_dataset(tmp_path, edits_per_image=3)
    assert [p.name for p in coll] == [f"{n}.jpg" for n in "abcde"]
    assert len(queries) == 15 and all(p.is_file() for p in coll + queries)
    assert not stale.exists()
    used = [demo.original_of(q) for q in queries]
    assert used == [n for n in "abcde" for _ in range(3)]
    edits = [q.stem.split("__")[1] for q in queries]
    assert set(edits) == set(demo.TRANSFORMS)  # every edit is used
    with Image.open(queries[0]) as im:
        assert im.format == "JPEG"

    # a second run leaves identical files alone, so the index sees them as unchanged
    mtimes = {p: p.stat().st_mtime_ns for p in coll + queries}
    os.utime(coll[0], ns=(1, 1))
    again = demo.make_dataset(tmp_path, edits_per_image=3)
    assert again == (coll, queries)
    assert coll[0].stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items() if p != coll[0])

    with pytest.raises(ConfigError):
        demo.make_dataset(tmp_path, edits_per_image=0)
    monkeypatch.setattr(demo, "sample_images", lambda: {"a": fake["a"]})
    with pytest.raises(demo.LookalikeError, match="sample images"):
        demo.make_dataset(tmp_path)


def test_main_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, k, console: calls.append((out, k)))
    assert demo.main(tmp_path, 3) == 0
    assert calls == [(tmp_path, 3)]

    def fail(out: Path, k: int, console: object) -> None:
        raise IndexStateError("index built with another model; delete it")

    monkeypatch.setattr(demo, "run_demo", fail)
    assert demo.main(tmp_path) == IndexStateError.exit_code
    assert "error: index built with another model" in capsys.readouterr().out


def test_bad_k(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="k must be"):
        demo.run_demo(tmp_path, k=0)


@pytest.mark.slow
def test_demo_end_to_end(
    tmp_path: Path, lookalike_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = demo.run_demo(tmp_path / "out", k=3)
    assert result.accuracy >= 0.8
    assert len(result.originals) >= 12
    assert len(result.queries) == 3 * len(result.originals)
    assert all(len(q.hits) == 3 for q in result.queries)
    assert all(q.correct == demo.is_match(q.path, q.hits[0].path) for q in result.queries)
    assert result.report is not None and result.report.added == len(result.originals)
    assert result.html.is_file()
    assert 0.0 < result.seconds < 600.0
    text = result.html.read_text(encoding="utf-8")
    assert text.count('class="row"') == len(result.queries)
    assert len(list((result.html.parent / THUMBS_DIR).iterdir())) == len(result.originals) + len(
        result.queries
    )
    out = capsys.readouterr().out
    assert f"top-1 accuracy: {result.accuracy:.1%}" in out
    assert "✓" in out
    # one verified pair drawn: an edited copy and the original it found
    assert result.match_png is not None and result.match_png.stat().st_size > 1000
    inliers = int(re.search(r"(\d+) inliers of \d+ RootSIFT matches", out).group(1))
    assert inliers >= 20
    # the same index searched over HTTP by the service, for a moment
    assert result.served is not None and result.served["id"] == result.queries[0].hits[0].id
    assert result.page
    assert "the same search over HTTP" in out and "http://127.0.0.1:8000/docs" in out

    # running it again re-syncs the existing index instead of failing
    assert demo.main(tmp_path / "out", k=3) == 0
    out = capsys.readouterr().out
    assert f"unchanged {len(result.originals)}" in out
    assert "added 0" in out
