"""Evaluation stage: benchmark loaders and retrieval / recognition metrics."""

from __future__ import annotations

from lookalike.evaluate.datasets import (
    DATASETS,
    Query,
    RetrievalDataset,
    apply_exclusions,
    load_dataset,
    load_holidays,
    load_labelled_folder,
    load_oxford,
)
from lookalike.evaluate.labelled import (
    GalleryReport,
    LabelledReport,
    gallery_metrics,
    labelled_metrics,
)
from lookalike.evaluate.metrics import (
    average_precision,
    average_precision_at_k,
    evaluate_rankings,
    global_average_precision,
    hit_ranks,
    mean_average_precision,
    mean_average_precision_at_k,
    mean_precision_at_k,
    mean_recall_at_k,
    precision_at_k,
    recall_at_k,
)
from lookalike.evaluate.run import evaluate, evaluate_dataset

__all__ = [
    "DATASETS",
    "GalleryReport",
    "LabelledReport",
    "Query",
    "RetrievalDataset",
    "apply_exclusions",
    "average_precision",
    "average_precision_at_k",
    "evaluate",
    "evaluate_dataset",
    "evaluate_rankings",
    "gallery_metrics",
    "global_average_precision",
    "hit_ranks",
    "labelled_metrics",
    "load_dataset",
    "load_holidays",
    "load_labelled_folder",
    "load_oxford",
    "mean_average_precision",
    "mean_average_precision_at_k",
    "mean_precision_at_k",
    "mean_recall_at_k",
    "precision_at_k",
    "recall_at_k",
]
