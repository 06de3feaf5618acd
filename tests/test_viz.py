"""The HTML result grid: rows, thumbnails, escaping, placeholders, truth borders."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.search import Hit
from lookalike.viz import THUMBS_DIR, write_result_grid

NASTY = '<b>&"'


class _Page(HTMLParser):
    """Collects the tags of a page: (tag, attrs) in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def with_class(self, name: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.tags if name in (a.get("class") or "").split()]

    def attr(self, tag: str, key: str) -> list[str]:
        return [a[key] for t, a in self.tags if t == tag and a.get(key) is not None]


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def hits(*items: tuple[Path | str, float]) -> list[Hit]:
    return [Hit(rank, rank * 10, str(p), s, {}) for rank, (p, s) in enumerate(items, start=1)]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    return {
        "red": write_image(src / "red.png", (255, 0, 0), (400, 300)),
        "green": write_image(src / "green.jpg", (0, 255, 0), (120, 500)),
        "blue": write_image(src / "blue.png", (0, 0, 255), (50, 40)),
        "nasty": write_image(src / f"dir{NASTY}" / f"x{NASTY}.png", (9, 9, 9), (64, 64)),
    }


def test_rows_thumbnails_and_links(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "report" / "page.html"
    rows = [
        (images["red"], hits((images["red"], 0.9), (images["green"], 0.5))),
        (str(images["green"]), hits((images["green"], 0.8), (images["blue"], 0.25))),
        (images["blue"], hits((images["blue"], 0.7))),
    ]
    assert write_result_grid(out, rows, thumb_px=100) == out
    page = parse(out)
    assert len(page.with_class("row")) == 3
    # every row: the query then its hits
    assert len(page.with_class("cell")) == 3 + 5
    assert len(page.with_class("query")) == 3

    thumbs = sorted((out.parent / THUMBS_DIR).iterdir())
    assert len(thumbs) == 3  # one per distinct image, reused across rows
    for t in thumbs:
        with Image.open(t) as im:
            assert im.format == "JPEG"
            assert max(im.size) <= 100
    with Image.open(next(t for t in thumbs if t.name.startswith("blue"))) as im:
        assert im.size == (50, 40)  # never enlarged
    with Image.open(next(t for t in thumbs if t.name.startswith("red"))) as im:
        assert im.size == (100, 75)

    srcs = page.attr("img", "src")
    assert len(srcs) == 8
    for src in srcs:
        assert not src.startswith(("/", "file:"))
        assert (out.parent / src).is_file()
    for href in page.attr("a", "href"):  # full-size images, relative to the page
        assert href.startswith("../src/")
        assert (out.parent / href).resolve().is_file()

    text = out.read_text(encoding="utf-8")
    assert "#2" in text and "0.250" in text  # rank and score under the hit


def test_paths_are_escaped(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "page.html"
    nasty = images["nasty"]
    write_result_grid(out, [(nasty, hits((nasty, 1.0)))], title=f"t{NASTY}")
    text = out.read_text(encoding="utf-8")
    assert NASTY not in text
    assert html.escape(str(nasty), quote=True) in text
    assert html.escape(f"t{NASTY}") in text
    page = parse(out)  # the parser decodes entities: the attribute is the exact path
    assert [a["title"] for a in page.with_class("cell")] == [str(nasty)] * 2
    # no tag was injected: the only <b> elements are the two captions
    assert sum(t == "b" for t, _ in page.tags) == 2
    (thumb,) = (out.parent / THUMBS_DIR).iterdir()
    assert re.fullmatch(r"[\w-]+\.jpg", thumb.name)  # a safe file name


def test_unreadable_images_get_a_placeholder(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "page.html"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    missing = tmp_path / "gone.png"
    rows = [
        (missing, hits((images["red"], 0.9), (missing, 0.4), (corrupt, 0.3))),
        (images["red"], []),
    ]
    write_result_grid(out, rows)
    page = parse(out)
    assert len(page.with_class("row")) == 2
    assert len(page.with_class("placeholder")) == 3  # query, missing hit, corrupt hit
    assert len(page.attr("img", "src")) == 2  # the red image, in both rows
    assert len(list((out.parent / THUMBS_DIR).iterdir())) == 1
    assert "no results" in out.read_text(encoding="utf-8")


def test_truth_colours_borders_and_counts(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "page.html"
    red, green, blue = images["red"], images["green"], images["blue"]
    rows = [
        (red, hits((red, 0.9), (green, 0.5), (blue, 0.1))),
        (green, hits((blue, 0.6), (green, 0.4))),
    ]

    def truth(query: str, result: str) -> bool | None:
        if Path(result).stem == "blue":
            return None  # unknown: no border colour
        return Path(query).stem == Path(result).stem

    write_result_grid(out, rows, truth=truth)
    page = parse(out)
    states = [
        next((s for s in ("query", "right", "wrong") if s in (a["class"] or "").split()), None)
        for a in page.with_class("cell")
    ]
    assert states == ["query", "right", "wrong", None, "query", None, "right"]
    text = out.read_text(encoding="utf-8")
    # first row judged right, second row's first hit has no verdict: 1 of 1 judged
    assert "top-1 right for 1/1 (100%)" in text
    assert 'class="legend"' in text


def test_no_truth_no_colours(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "page.html"
    write_result_grid(out, [(images["red"], hits((images["green"], 0.5)))])
    page = parse(out)
    assert not page.with_class("right") and not page.with_class("wrong")
    assert 'class="legend"' not in out.read_text(encoding="utf-8")


def test_empty_rows(tmp_path: Path) -> None:
    out = tmp_path / "new" / "page.html"
    write_result_grid(out, [])
    assert "No queries" in out.read_text(encoding="utf-8")
    assert (out.parent / THUMBS_DIR).is_dir()


def test_thumbnail_follows_the_file(tmp_path: Path) -> None:
    """A changed image gets a new thumbnail, not the stale one."""
    out = tmp_path / "page.html"
    img = write_image(tmp_path / "a.png", (255, 0, 0), (32, 32))
    write_result_grid(out, [(img, [])])
    write_image(img, (0, 0, 255), (40, 32))
    write_result_grid(out, [(img, [])])
    (src,) = parse(out).attr("img", "src")
    with Image.open(out.parent / src) as im:
        assert im.size == (40, 32)
        assert np.asarray(im.convert("RGB"))[16, 16, 2] > 200


@pytest.mark.parametrize("bad", [0, -5, 1.5, "160"])
def test_bad_thumb_size(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="thumb_px"):
        write_result_grid(tmp_path / "page.html", [], thumb_px=bad)  # type: ignore[arg-type]
