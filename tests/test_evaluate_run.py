"""evaluate_dataset: index a benchmark's database, run its queries (with boxes), score them.

A tiny Oxford-style tree is made in tmp_path: one query image holding two unrelated photos
side by side, queried twice with a box around each half; near-duplicates of each half are
the positives, and the exact half (plus the query image) is junk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import near_duplicate, photo
from PIL import Image

from lookalike.errors import IndexStateError
from lookalike.evaluate import evaluate, evaluate_dataset, load_dataset
from lookalike.extract import Extractor, get_preset
from lookalike.indexing import FROM_INDEX, index_files

W, H = 128, 96  # size of each half of the query image


def write_oxford(root: Path) -> None:
    left = photo("chelsea", W).resize((W, H), Image.Resampling.LANCZOS)
    right = photo("coffee", W).resize((W, H), Image.Resampling.LANCZOS)
    scene = Image.new("RGB", (2 * W, H))
    scene.paste(left, (0, 0))
    scene.paste(right, (W, 0))
    images = {
        "scene": scene,
        "left_1": near_duplicate(left, 1),
        "left_2": near_duplicate(left, 2),
        "left_exact": left,
        "right_1": near_duplicate(right, 1),
        "right_2": near_duplicate(right, 2),
        "right_exact": right,
        "other_1": photo("rocket", W),
        "other_2": photo("astronaut", W),
    }
    (root / "jpg").mkdir(parents=True)
    for name, img in images.items():
        img.save(root / "jpg" / f"{name}.jpg", quality=95)
    gt = root / "gt_files"
    gt.mkdir()
    for side, box in (("left", (0, 0, W, H)), ("right", (W, 0, 2 * W, H))):
        (gt / f"{side}_1_query.txt").write_text("oxc1_scene " + " ".join(map(str, box)) + "\n")
        (gt / f"{side}_1_good.txt").write_text(f"{side}_1\n")
        (gt / f"{side}_1_ok.txt").write_text(f"{side}_2\n")
        (gt / f"{side}_1_junk.txt").write_text(f"{side}_exact\nscene\n")


@pytest.fixture
def oxford(tmp_path: Path):
    write_oxford(tmp_path / "oxford")
    return load_dataset("oxford5k", tmp_path / "oxford")


def run(dataset, index_dir: Path, extractor: Extractor, **kwargs: object) -> dict:
    return evaluate_dataset(dataset, index_dir, extractor.conf, extractor=extractor, **kwargs)


def test_boxes_and_junk(oxford, tmp_path, default_extractor):
    calls: list[tuple[str, int, int]] = []
    result = run(
        oxford,
        tmp_path / "index",
        default_extractor,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    assert result["dataset"] == "oxford"
    assert result["queries"] == 2 and result["images"] == 9 and result["failed"] == 0
    assert result["descriptor"] == default_extractor.conf.descriptor()
    # Each half, cropped by its box, finds its two near-duplicates first once the junk
    # (the exact half, ranked first, and the query image) is set aside.
    assert result["metrics"]["mAP"] == 100.0
    assert result["metrics"]["queries"] == 2
    assert result["query_ms"] > 0 and result["index_seconds"] > 0
    assert calls[-1] == ("search", 2, 2)
    assert ("index", 9, 9) in calls

    # Junk counts as wrong when it is not declared: the exact half outranks the positives.
    no_junk = dataclasses.replace(
        oxford, queries=tuple(dataclasses.replace(q, junk=()) for q in oxford.queries)
    )
    assert run(no_junk, tmp_path / "index", default_extractor)["metrics"]["mAP"] < 100.0

    # Without the boxes the two queries are the same whole image: both cannot be perfect.
    no_box = dataclasses.replace(
        oxford, queries=tuple(dataclasses.replace(q, box=None) for q in oxford.queries)
    )
    assert run(no_box, tmp_path / "index", default_extractor)["metrics"]["mAP"] < 100.0


def test_index_is_reused(oxford, tmp_path, default_extractor):
    first = run(oxford, tmp_path / "index", default_extractor)
    again = run(oxford, tmp_path / "index", default_extractor)
    assert again["metrics"] == first["metrics"]
    assert again["images_per_second"] == 0.0  # nothing described again

    other = default_extractor.conf.replace(pooling="gem")
    with pytest.raises(IndexStateError, match="pooling"):
        evaluate_dataset(oxford, tmp_path / "index", other)


def test_images_outside_the_dataset_are_ignored(oxford, tmp_path, default_extractor):
    # An index that also holds a copy of a positive under another path: mapped to no
    # dataset position, so it is neither a hit nor a miss.
    extra = tmp_path / "elsewhere" / "left_copy.jpg"
    extra.parent.mkdir()
    extra.write_bytes((oxford.images[0].parent / "left_exact.jpg").read_bytes())
    index = tmp_path / "index"
    index_files([extra], index, default_extractor.conf, extractor=default_extractor)
    result = run(oxford, index, default_extractor)
    assert result["metrics"]["mAP"] == 100.0


def test_k_limits_the_ranking(oxford, tmp_path, default_extractor):
    result = run(oxford, tmp_path / "index", default_extractor, k=1)
    # Only the first result (the exact half: junk) is kept, so no positive is found.
    assert result["metrics"]["mAP"] == 0.0
    assert result["metrics"]["R@10"] == 0.0


def test_no_queries_with_positives(tmp_path, default_extractor):
    root = tmp_path / "flat"
    root.mkdir()
    photo("rocket", 64).save(root / "a.png")
    (root / "solo").mkdir()
    photo("coffee", 64).save(root / "solo" / "b.png")
    dataset = load_dataset("folder", root)
    result = run(dataset, tmp_path / "index", default_extractor)
    assert result["queries"] == 1
    assert result["metrics"]["queries"] == 0
    assert result["metrics"]["mAP"] is None  # nan would not be valid JSON


def test_evaluate_reuses_an_index_with_its_own_settings(oxford, tmp_path):
    root, index = tmp_path / "oxford", tmp_path / "index"
    first = evaluate("oxford5k", root, index, workers=0, backend="numpy", device="cpu")
    assert list(first)[:2] == ["dataset", "preset"] and first["preset"] == "default"
    assert first["index"]["backend"] == "numpy" and first["metrics"]["mAP"] == 100.0
    again = evaluate("oxford5k", root, index, workers=0)  # no settings repeated
    assert again["preset"] == FROM_INDEX and again["index"] == first["index"]
    assert again["metrics"] == first["metrics"] and again["images_per_second"] == 0.0
    with pytest.raises(IndexStateError, match="pooling"):
        evaluate("oxford5k", root, index, "fast", workers=0)
    # evaluate_dataset without index_conf takes the reused index's structure too
    reused = evaluate_dataset(oxford, index, get_preset("default").replace(workers=0))
    assert reused["index"]["backend"] == "numpy"
