"""Benchmark loaders on tiny fake ground-truth trees, and on the real data when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.evaluate.datasets import (
    DATASETS,
    Query,
    apply_exclusions,
    load_dataset,
    load_holidays,
    load_labelled_folder,
    load_oxford,
)
from lookalike.evaluate.metrics import evaluate_rankings


def touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def oxford_root(tmp_path: Path) -> Path:
    root = tmp_path / "oxford"
    for name in ["a_000003", "a_000001", "a_000002", "a_000004", "a_000005", "b_000001"]:
        touch(root / "jpg" / f"{name}.jpg")
    gt = root / "gt_files"
    touch(gt / "a_1_query.txt", "oxc1_a_000001 1.5 2.0 30.0 40.5\n")
    touch(gt / "a_1_good.txt", "a_000001\na_000002\na_000002\n")  # repeats occur in real files
    touch(gt / "a_1_ok.txt", "a_000003\n")
    touch(gt / "a_1_junk.txt", "a_000004\n")
    # Paris-style query line, no oxc1_ prefix; empty ok and junk lists
    touch(gt / "b_1_query.txt", "b_000001 0 0 10 10\n")
    touch(gt / "b_1_good.txt", "b_000001\n")
    touch(gt / "b_1_ok.txt")
    touch(gt / "b_1_junk.txt")
    return root


def test_load_oxford(oxford_root: Path) -> None:
    ds = load_oxford(oxford_root)
    assert [p.stem for p in ds.images] == [
        "a_000001",
        "a_000002",
        "a_000003",
        "a_000004",
        "a_000005",
        "b_000001",
    ]
    assert ds.name == "oxford"
    assert ds.labels is None
    assert ds.queries[0] == Query(
        name="a_1",
        image=oxford_root / "jpg" / "a_000001.jpg",
        box=(1.5, 2.0, 30.0, 40.5),
        positives=(0, 1, 2),  # good + ok, query image included, deduplicated
        junk=(3,),
        exclude=(),
    )
    assert ds.queries[1].image.stem == "b_000001"
    assert ds.queries[1].positives == (5,)
    assert ds.queries[1].junk == ()


def test_oxford_prefix_kept_when_the_image_carries_it(oxford_root: Path) -> None:
    touch(oxford_root / "jpg" / "oxc1_c_000001.jpg")
    touch(oxford_root / "gt_files" / "c_1_query.txt", "oxc1_c_000001 0 0 5 5\n")
    for kind in ("good", "ok", "junk"):
        touch(oxford_root / "gt_files" / f"c_1_{kind}.txt", "oxc1_c_000001\n" * (kind == "good"))
    query = load_oxford(oxford_root).queries[2]
    assert query.image.name == "oxc1_c_000001.jpg"


def test_oxford_junk_changes_the_score(oxford_root: Path) -> None:
    query = load_oxford(oxford_root).queries[0]
    ranking = np.array([0, 3, 1, 2, 4, 5])  # junk image 3 ranked second
    table = evaluate_rankings([apply_exclusions(ranking, query)], [query.positives], [query.junk])
    assert table["mAP"] == 100.0
    assert evaluate_rankings([ranking], [query.positives])["mAP"] < 100.0


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("gt_files", "gt_files"),
        ("jpg", "jpg"),
        ("gt_files/a_1_ok.txt", "a_1_ok.txt"),
        ("jpg/a_000003.jpg", "a_000003"),  # named by a_1_ok.txt, not in the database
    ],
)
def test_oxford_missing_files(oxford_root: Path, remove: str, match: str) -> None:
    path = oxford_root / remove
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(ConfigError, match=match):
        load_oxford(oxford_root)


def test_oxford_bad_query_line(oxford_root: Path) -> None:
    touch(oxford_root / "gt_files" / "a_1_query.txt", "oxc1_a_000001 1 2 3\n")
    with pytest.raises(ConfigError, match="x1 y1 x2 y2"):
        load_oxford(oxford_root)


@pytest.fixture
def holidays_root(tmp_path: Path) -> Path:
    root = tmp_path / "holidays"
    ids = ["100000", "100001", "100100", "100101", "100102"]
    for name in ids:
        touch(root / "jpg" / f"{name}.jpg")
    gt = {
        "images": ids,
        "queries": [
            {"query": "100000", "positives": ["100001"]},
            {"query": "100100", "positives": ["100102", "100101"]},
        ],
    }
    touch(root / "gt.json", json.dumps(gt))
    return root


def test_load_holidays(holidays_root: Path) -> None:
    ds = load_holidays(holidays_root)
    assert [p.name for p in ds.images][:2] == ["100000.jpg", "100001.jpg"]
    assert ds.queries == (
        Query("100000", holidays_root / "jpg" / "100000.jpg", None, (1,), (), (0,)),
        Query("100100", holidays_root / "jpg" / "100100.jpg", None, (3, 4), (), (2,)),
    )


def test_holidays_integer_ids(holidays_root: Path) -> None:
    gt = json.loads((holidays_root / "gt.json").read_text())
    gt["images"] = [int(i) for i in gt["images"]]
    gt["queries"] = [{"query": int(q["query"]), "positives": q["positives"]} for q in gt["queries"]]
    (holidays_root / "gt.json").write_text(json.dumps(gt))
    assert load_holidays(holidays_root) == load_holidays(holidays_root)
    assert load_holidays(holidays_root).queries[1].positives == (3, 4)


def test_holidays_missing_files(holidays_root: Path) -> None:
    (holidays_root / "jpg" / "100101.jpg").unlink()
    with pytest.raises(ConfigError, match=r"100101\.jpg"):
        load_holidays(holidays_root)
    (holidays_root / "gt.json").unlink()
    with pytest.raises(ConfigError, match=r"gt\.json"):
        load_holidays(holidays_root)


def test_holidays_bad_ground_truth(holidays_root: Path) -> None:
    gt_path = holidays_root / "gt.json"
    gt_path.write_text(json.dumps({"images": ["100000"], "queries": [{"query": "100000"}]}))
    with pytest.raises(ConfigError, match="not a Holidays ground truth"):
        load_holidays(holidays_root)
    gt = {"images": ["100000"], "queries": [{"query": "100000", "positives": ["999"]}]}
    gt_path.write_text(json.dumps(gt))
    with pytest.raises(ConfigError, match="'999'"):
        load_holidays(holidays_root)


def test_load_labelled_folder(tmp_path: Path) -> None:
    for rel in ["cats/a.jpg", "cats/b.PNG", "dogs/c.jpg", "dogs/sub/d.jpeg", "loose.webp"]:
        touch(tmp_path / "pets" / rel)
    touch(tmp_path / "pets" / "cats" / "notes.txt")
    ds = load_labelled_folder(tmp_path / "pets")
    names = [p.relative_to(tmp_path / "pets").as_posix() for p in ds.images]
    assert names == ["cats/a.jpg", "cats/b.PNG", "dogs/c.jpg", "dogs/sub/d.jpeg", "loose.webp"]
    assert ds.labels == ("cats", "cats", "dogs", "dogs", None)
    assert [(q.name, q.positives, q.exclude) for q in ds.queries] == [
        ("cats/a.jpg", (1,), (0,)),
        ("cats/b.PNG", (0,), (1,)),
        ("dogs/c.jpg", (3,), (2,)),
        ("dogs/sub/d.jpeg", (2,), (3,)),
    ]  # loose.webp is a distractor, not a query


def test_labelled_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_labelled_folder(tmp_path / "nope")
    touch(tmp_path / "empty" / "cats" / "notes.txt")
    with pytest.raises(ConfigError, match="no images"):
        load_labelled_folder(tmp_path / "empty")


def test_apply_exclusions() -> None:
    query = Query("q", Path("q.jpg"), None, positives=(1,), junk=(3,), exclude=(2,))
    got = apply_exclusions(np.array([2, 3, 0, 1], dtype=np.int64), query)
    np.testing.assert_array_equal(got, [3, 0, 1])  # junk stays: the metrics drop it
    no_exclude = Query("q", Path("q.jpg"), None, (1,), (), ())
    np.testing.assert_array_equal(apply_exclusions(np.array([2, 3]), no_exclude), [2, 3])
    np.testing.assert_array_equal(apply_exclusions(np.array([], dtype=np.int64), query), [])
    with pytest.raises(ValueError, match="1-D"):
        apply_exclusions(np.zeros((2, 2), dtype=np.int64), query)


def test_load_dataset_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="oxford5k, paris6k, holidays, folder"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_load_dataset_missing_root(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_dataset(kind, tmp_path / "missing")


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_load_dataset_empty_root(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ConfigError, match="expected"):
        load_dataset(kind, tmp_path)


def test_load_dataset_dispatches(oxford_root: Path, holidays_root: Path) -> None:
    assert load_dataset("paris6k", oxford_root) == load_oxford(oxford_root)
    assert load_dataset("holidays", holidays_root) == load_holidays(holidays_root)


def _data_dir() -> Path:
    env = os.environ.get("LOOKALIKE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _oracle_table(ds_kind: str) -> tuple[int, int, int, dict[str, float]]:
    """Load a real benchmark and score a perfect ranking (junk first, then positives)."""
    root = _data_dir() / ds_kind
    if not root.is_dir():
        pytest.skip(f"benchmark data not found at {root}; set LOOKALIKE_DATA")
    ds = load_dataset(ds_kind, root)
    rankings = []
    for q in ds.queries:
        # the excluded query image first: apply_exclusions must drop it, else AP < 1
        order = [*q.exclude, *q.junk, *q.positives, *range(len(ds.images))]
        ranking = np.array(list(dict.fromkeys(order)), dtype=np.int64)
        rankings.append(apply_exclusions(ranking, q))
    table = evaluate_rankings(
        rankings, [q.positives for q in ds.queries], [q.junk for q in ds.queries]
    )
    n_pos = sum(len(q.positives) for q in ds.queries)
    return len(ds.images), len(ds.queries), n_pos, table


@pytest.mark.slow
def test_real_oxford5k() -> None:
    n_images, n_queries, _, table = _oracle_table("oxford5k")
    assert (n_images, n_queries) == (845, 55)
    assert table["mAP"] == 100.0
    assert table["queries"] == 55


@pytest.mark.slow
def test_real_holidays() -> None:
    n_images, n_queries, n_pos, table = _oracle_table("holidays")
    assert (n_images, n_queries, n_pos) == (805, 295, 495)
    assert table["mAP"] == 100.0
    assert table["queries"] == 295


def test_grocery_classes_read_in_class_id_order(tmp_path: Path) -> None:
    from lookalike.evaluate.datasets import grocery_classes

    header = "Class Name (str),Class ID (int),Coarse Class Name (str),Iconic Image Path (str)\n"
    (tmp_path / "classes.csv").write_text(
        header + "Oatly,1,Milk,/iconic/Packages/Oatly/Oatly_Iconic.jpg\n"
        "Kiwi,0,Kiwi,/iconic/Fruit/Kiwi/Kiwi_Iconic.jpg\n"
    )
    classes = grocery_classes(tmp_path)
    assert [(c.name, c.id) for c in classes] == [("Kiwi", 0), ("Oatly", 1)]
    assert classes[1].iconic == (tmp_path / "iconic/Packages/Oatly/Oatly_Iconic.jpg").resolve()
    with pytest.raises(ConfigError, match=r"classes\.csv"):
        grocery_classes(tmp_path / "nowhere")
