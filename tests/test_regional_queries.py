"""Regional query crops (the catalogue case) and the rendered catalogue queries: the crop
grid, crop descriptors against a brute-force loop, a pasted item found first thanks to
the crops and not by the whole photo, the settings recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, photo
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.evaluate.synthetic import RenderConf, render_query
from lookalike.extract import get_preset, query_crop_boxes
from lookalike.images import read_image, resize_long_side
from lookalike.index.manifest import QueryDefaults, parse_query


def test_the_crop_grid_spreads_overlapping_boxes_from_edge_to_edge() -> None:
    assert query_crop_boxes(100, 80, ()) == []
    half = query_crop_boxes(100, 80, (0.5,))
    assert len(half) == 9
    assert (
        half[0] == (0, 0, 50, 40) and half[4] == (25, 20, 75, 60) and half[-1] == (50, 40, 100, 80)
    )
    big = query_crop_boxes(100, 80, (0.7,))
    assert big == [(0, 0, 70, 56), (30, 0, 100, 56), (0, 24, 70, 80), (30, 24, 100, 80)]
    assert len(query_crop_boxes(640, 480, (0.7, 0.5))) == 13


def test_crop_views_equal_describing_each_crop_alone(default_extractor, tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"  # larger than both readings: JPEG decoding may shrink in
    #   the decoder, so the whole view must be read as indexing reads it
    photo("astronaut", 1400).crop((0, 0, 1400, 933)).save(path, quality=92)
    views = default_extractor.extract_query(path, rotations=(0,), crops=(0.7, 0.5))
    assert views.shape == (1 + 4 + 9, default_extractor.dim)
    whole = default_extractor.extract_query(path, rotations=(0,))
    assert whole.shape == (1, default_extractor.dim)  # no crops unless asked
    np.testing.assert_array_equal(views[0], whole[0])
    full = read_image(path, round(512 / 0.5))
    assert max(full.size) == 1024
    for row, box in enumerate(query_crop_boxes(*full.size, (0.7, 0.5)), start=1):
        crop = np.asarray(resize_long_side(full.crop(box), 512, False))
        alone = default_extractor.extract_arrays([crop]).global_[0]
        np.testing.assert_allclose(views[row], alone, atol=1e-5)


def _catalogue(folder: Path) -> tuple[Path, Path]:
    """A gallery of clean items and a query photo in which the ``rocket`` item covers 30 %
    of the ``coffee`` photo, tilted (``coffee`` is in the gallery too)."""
    folder.mkdir()
    for name in PHOTOS:
        photo(name, 256).save(folder / f"{name}.png")
    conf = RenderConf(
        area=(0.3, 0.3), tilt=30, rotation=10, blur=0, glare=0, jpeg=(90, 90), colour=0
    )
    query, rendered = render_query(
        np.asarray(photo("rocket", 256)),
        np.asarray(photo("coffee", 640)),
        np.random.default_rng(17),
        conf,
    )
    assert rendered.area == pytest.approx(0.3, abs=0.01) and 0 <= rendered.tilt <= 30
    path = folder.parent / "query.jpg"
    Image.fromarray(query).save(path)
    return folder, path


def test_a_pasted_item_is_found_first_with_crops_not_by_the_whole_photo(
    tmp_path: Path, build
) -> None:
    from lookalike.search import Searcher

    folder, query = _catalogue(tmp_path / "gallery")
    build(folder, tmp_path / "index")
    with Searcher.open(tmp_path / "index", crops=()) as whole:
        (answer,) = whole.answer([query], k=3)
    assert Path(answer.hits[0].path).stem == "coffee"  # the background wins
    with Searcher.open(tmp_path / "index", crops=(0.7, 0.5)) as regional:
        (answer,) = regional.answer([query], k=3)
    assert Path(answer.hits[0].path).stem == "rocket"


def test_the_small_gallery_default_finds_the_pasted_item_without_flags(
    tmp_path: Path, build, capsys
) -> None:
    """``lookalike search`` with no option on a small gallery: regional crops and
    verification (``rerank="auto"``) put the item first, verified by many inliers, where
    the whole-image descriptor alone returns the background photo."""
    from lookalike.cli import main
    from lookalike.search import SMALL_GALLERY_CROPS, Searcher

    folder, query = _catalogue(tmp_path / "gallery")
    build(folder, tmp_path / "index")
    with Searcher.open(tmp_path / "index", crops=()) as whole:
        (plain,) = whole.answer([query], k=3)
    assert Path(plain.hits[0].path).stem == "coffee"
    with Searcher.open(tmp_path / "index", "auto") as auto:
        assert auto.verified and auto.conf.query_crops == SMALL_GALLERY_CROPS
        (answer,) = auto.answer([query], k=3)
    assert Path(answer.hits[0].path).stem == "rocket"
    assert answer.hits[0].inliers >= 15 and answer.hits[1].inliers < answer.hits[0].inliers
    capsys.readouterr()
    assert main(["search", str(query), "--index", str(tmp_path / "index"), "--json"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["results"][0] == answer.hits[0].to_dict()


def test_auto_settings_follow_the_gallery_size() -> None:
    from lookalike.search import SMALL_GALLERY, auto_settings

    assert auto_settings(10, ()) == (["verify"], (0.5,))
    assert auto_settings(SMALL_GALLERY, (0.7, 0.5)) == (["verify"], (0.7, 0.5))  # recorded
    assert auto_settings(SMALL_GALLERY + 1, ()) == ([], ())
    assert auto_settings(SMALL_GALLERY + 1, (0.5,)) == ([], (0.5,))


def test_crops_are_recorded_as_the_index_search_defaults(tmp_path: Path, build) -> None:
    from lookalike.index import IndexStore
    from lookalike.search import Searcher

    folder, _ = _catalogue(tmp_path / "gallery")
    conf = get_preset("default").replace(query_crops=(0.5,), crop_penalty=0.1, workers=0)
    from lookalike.indexing import index_folder

    index_folder(folder, tmp_path / "index", conf)
    saved = json.loads((tmp_path / "index" / "manifest.json").read_text())["query"]
    assert saved["crops"] == [0.5] and saved["crop_penalty"] == 0.1
    with IndexStore.open(tmp_path / "index") as store:
        assert store.manifest.query.crops == (0.5,)
    with Searcher.open(tmp_path / "index") as searcher:
        assert searcher.conf.query_crops == (0.5,) and searcher.conf.crop_penalty == 0.1
        views, penalty = searcher._views(searcher_query(folder), None)
        assert len(views) == 3 + 9 and penalty.ravel().tolist() == pytest.approx(
            [0.0, 0.05, 0.05] + [0.1] * 9
        )
    # indexing more with the index's own settings keeps them
    from lookalike.cli import main

    photo("camera", 200).save(folder / "more.png")
    assert main(["index", str(folder), "--index", str(tmp_path / "index")]) == 0
    with IndexStore.open(tmp_path / "index") as store:
        assert store.manifest.query.crops == (0.5,) and len(store) == len(PHOTOS) + 1
    # a re-embedded copy (what `lookalike train --index` makes) keeps the search defaults
    from lookalike.indexing.reembed import reembed_index

    reembed_index(tmp_path / "index", tmp_path / "copy", get_preset("upright").replace(workers=0))
    with IndexStore.open(tmp_path / "copy") as store:
        assert store.manifest.query == QueryDefaults((0, 90, 270), 0.05, (0.5,), 0.1)
    # an index written before crops existed reads as none
    assert parse_query({"rotations": [0]}) == QueryDefaults((0,), 0.0, (), 0.05)
    for bad in ([1.5], [0.1], ["x"]):
        with pytest.raises(ValueError, match=r"query\.crops"):
            parse_query({"rotations": [0], "crops": bad})


def searcher_query(folder: Path):
    from lookalike.query import Query

    return Query(image=folder / "rocket.png")


@pytest.mark.parametrize("crops", [(0.0,), (1.0,), (0.1,)])
def test_bad_crop_sizes_are_config_errors(crops: tuple) -> None:
    with pytest.raises(ConfigError, match="query_crops"):
        get_preset("default").replace(query_crops=crops)


def test_cli_crops_option(capsys) -> None:
    from lookalike.cli import main
    from lookalike.cli.options import parse_crops

    assert main(["search", "--index", "nowhere", "--id", "1", "--crops", "0.5"]) == 2
    assert "--id queries" in capsys.readouterr().err

    assert parse_crops(None) is None
    assert parse_crops("none") == ()
    assert parse_crops("0.7,0.5") == (0.7, 0.5)
    for bad in ("2", "0.1", "x"):
        with pytest.raises(ConfigError, match="--crops"):
            parse_crops(bad)


def test_rendered_queries_are_seeded_and_keep_the_item_in_the_frame() -> None:
    item = np.asarray(photo("rocket", 200))
    background = np.asarray(photo("coins", 300))
    a, ra = render_query(item, background, np.random.default_rng(7))
    b, rb = render_query(item, background, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert ra.to_dict() == rb.to_dict()
    h, w = a.shape[:2]
    assert {w, h} == {640, 480}
    assert 0.05 < ra.area < 0.7 and 0 <= ra.tilt <= 40 and abs(ra.rotation) <= 30
    ih, iw = item.shape[:2]
    corners = np.array([[0, 0, 1], [iw, 0, 1], [iw, ih, 1], [0, ih, 1]])
    mapped = corners @ ra.homography.T
    xy = mapped[:, :2] / mapped[:, 2:]
    assert (xy >= -1).all() and (xy[:, 0] <= w + 1).all() and (xy[:, 1] <= h + 1).all()
    with pytest.raises(ConfigError, match="area"):
        RenderConf(area=(0.5, 0.2))
