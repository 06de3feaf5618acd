"""Training data: labels from parent folders or a CSV, and the stratified validation split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import write_images

from lookalike.errors import ConfigError
from lookalike.train.data import labelled_images, split_validation


@pytest.fixture
def grocery(tmp_path: Path) -> Path:
    """Fruit/Apple/Granny-Smith (5), Fruit/Apple/Pink-Lady (3), Packages/Oat-Milk (1),
    and one unlabelled image at the top."""
    root = tmp_path / "data"
    write_images(root / "Fruit" / "Apple" / "Granny-Smith", 5, side=32)
    write_images(root / "Fruit" / "Apple" / "Pink-Lady", 3, side=32)
    write_images(root / "Packages" / "Oat-Milk", 1, side=32)
    write_images(root, 1, side=32)
    return root


def test_the_label_is_the_parent_folder(grocery: Path) -> None:
    data = labelled_images(grocery)
    assert data.classes == ("Granny-Smith", "Oat-Milk", "Pink-Lady")
    assert len(data) == 9 and data.counts() == [5, 1, 3]
    for path, target in zip(data.paths, data.targets, strict=True):
        assert path.parent.name == data.classes[target]


def test_labels_from_a_csv(grocery: Path) -> None:
    csv = grocery / "labels.csv"
    csv.write_text(
        "path,label\n"
        "Fruit/Apple/Granny-Smith/img000.png,apple\n"
        "Fruit/Apple/Pink-Lady/img001.png,apple\n"
        "Packages/Oat-Milk/img000.png,milk\n"
        "img000.png,\n"
    )
    data = labelled_images(grocery, csv)
    assert data.classes == ("apple", "milk") and data.counts() == [2, 1]


def test_the_split_is_stratified_and_keeps_singletons_in_training(grocery: Path) -> None:
    data = labelled_images(grocery)
    train, val = split_validation(data, 0.4, seed=3)
    assert Counter(val.targets) == {0: 2, 2: 1}  # round(0.4 x 5), round(0.4 x 3); oat milk: 0
    assert Counter(train.targets) == {0: 3, 1: 1, 2: 2}
    assert set(train.paths).isdisjoint(val.paths) and len(train) + len(val) == len(data)
    assert split_validation(data, 0.4, seed=3) == (train, val)  # repeatable
    assert split_validation(data, 0.4, seed=4) != (train, val)
    _, tiny = split_validation(data, 0.01)
    assert Counter(tiny.targets) == {0: 1, 2: 1}  # at least one per class that can spare it
    _, most = split_validation(data, 0.99)
    assert Counter(most.targets) == {0: 4, 2: 2}  # at least one training image each


def test_bad_data_is_one_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        labelled_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no labelled images"):
        labelled_images(tmp_path / "empty")
    write_images(tmp_path / "one" / "cat", 2, side=32)
    with pytest.raises(ConfigError, match="one class"):
        labelled_images(tmp_path / "one")
    write_images(tmp_path / "one" / "dog", 2, side=32)
    for fraction in (0.0, 1.0):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            split_validation(labelled_images(tmp_path / "one"), fraction)
