"""The ``train`` stage: metric-learning fine-tuning of the descriptor on labelled images.

===============================  ============================================================
:func:`train`                    ``lookalike train DATA --out MODEL``: fine-tune, write the
                                 model directory (:mod:`lookalike.train.loop`)
:func:`train_and_index`          ``... --index INDEX``: also describe the index again with the
                                 new model, compare both, promote or report a regression
                                 (:mod:`lookalike.train.pipeline`)
:class:`TrainConf`               the settings; :data:`TRAIN_PRESETS` (:mod:`.conf`)
:class:`DescriptorModel`         backbone, learned GeM or R-MAC, projection + batch norm, L2
                                 (:mod:`.model`)
:func:`load_model`               read a model directory (:mod:`.model_dir`), what indexing
                                 with ``--model MODEL_DIR`` runs
:func:`build_loss`               pytorch-metric-learning losses and miners by preset,
                                 CurricularFace, dynamic margins, P-K batches (:mod:`.losses`)
:func:`labelled_images`          labels from parent folders or a CSV; stratified validation
                                 (:mod:`.data`)
===============================  ============================================================

The names are imported on first use, so ``import lookalike.train.model_dir`` (what indexing
with a trained model needs) does not load pytorch-metric-learning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "train": "loop",
    "Progress": "loop",
    "TrainingInterrupted": "loop",
    "train_and_index": "pipeline",
    "TrainOutcome": "pipeline",
    "TrainConf": "conf",
    "TRAIN_PRESETS": "conf",
    "parse_sizes": "conf",
    "train_preset": "conf",
    "DescriptorModel": "model",
    "load_model": "model_dir",
    "is_model_dir": "model_dir",
    "build_loss": "losses",
    "LOSS_PRESETS": "losses",
    "labelled_images": "data",
    "split_validation": "data",
    "LabelledImages": "data",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lookalike.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lookalike.train.{_WHERE[name]}"), name)
