"""Metrics of a labelled collection against itself: hand-computed values, PML's
AccuracyCalculator on random data, chunking, NMI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.evaluate.labelled import labelled_metrics


def on_circle(degrees: list[float]) -> np.ndarray:
    a = np.radians(degrees)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_values_computed_by_hand() -> None:
    # angle, label: the rankings are the angular distances (worked out in the comments)
    x = on_circle([0, 10, 30, 55, 105, 200])
    labels = ["A", "A", "B", "A", "B", "C"]
    # p0: p1 p2 p3 ... rel 1 0 1  (R=2)   p1: p0 p2 p3 ... rel 1 0 1 (R=2)
    # p2: p1 p3 p0 p4  rel 0 0 0 1 (R=1)  p3: p2 p1 p4 p0  rel 0 1 0 1 (R=2)
    # p4: p3 p2 ...    rel 0 1 (R=1)      p5: C has one image: not a query
    report = labelled_metrics(x, labels, ks=(1, 2, 3, 4), nmi=False)
    assert report.queries == 5
    assert report.recall_at == pytest.approx({1: 2 / 5, 2: 4 / 5, 3: 4 / 5, 4: 1.0})
    assert report.r_precision == pytest.approx((0.5 + 0.5 + 0 + 0.5 + 0) / 5)
    assert report.map_at_r == pytest.approx((0.5 + 0.5 + 0 + 0.5 * 0.5 + 0) / 5)
    (b, a) = report.worst
    assert (b.label, b.images, b.recall_at_1, b.confused_with) == ("B", 2, 0.0, "A")
    assert (a.label, a.images, a.recall_at_1, a.confused_with) == ("A", 3, 2 / 3, "B")
    assert report.to_dict()["recall_at"]["1"] == pytest.approx(0.4)


def test_agrees_with_pytorch_metric_learning_at_any_chunk() -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 300)
    centres = rng.standard_normal((12, 16))
    x = (centres[labels] + 1.5 * rng.standard_normal((300, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    theirs = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
    ).get_accuracy(x, labels, x, labels, ref_includes_query=True)
    for chunk in (7, 4096):
        mine = labelled_metrics(x, labels.tolist(), nmi=False, chunk=chunk)
        assert mine.recall_at[1] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
        assert mine.r_precision == pytest.approx(theirs["r_precision"], abs=1e-6)
        assert mine.map_at_r == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


def test_nmi_of_separated_and_of_random_clusters() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 25)
    x = np.eye(8, dtype=np.float32)[labels] + 0.01 * rng.standard_normal((100, 8)).astype(
        np.float32
    )
    assert labelled_metrics(x, labels.tolist()).nmi == pytest.approx(1.0)
    noise = rng.standard_normal((100, 8)).astype(np.float32)
    assert labelled_metrics(noise, labels.tolist()).nmi < 0.3


def test_bad_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="N labels"):
        labelled_metrics(np.zeros((3, 2), np.float32), [1, 2])
    with pytest.raises(ConfigError, match="no class has two images"):
        labelled_metrics(on_circle([0, 90, 180]), ["a", "b", "c"], nmi=False)
    with pytest.raises(ConfigError, match="K >= 1"):
        labelled_metrics(on_circle([0, 90]), ["a", "a"], ks=(0,))
    assert math.isfinite(labelled_metrics(on_circle([0, 90]), ["a", "a"], ks=(5,)).map_at_r)
