"""The metric-learning losses of ``lookalike.train``: pytorch-metric-learning's, by preset.

Every loss is called as PML's are, ``loss(embeddings, labels[, indices_tuple])`` on L2-
normalised ``(B, D)`` embeddings. *Classifier* losses (ArcFace, CosFace, sub-center ArcFace,
CurricularFace) hold a ``(D, classes)`` weight matrix: their parameters are the head that the
training loop gives its own learning rate. *Pair* losses (contrastive, triplet, N-pair,
multi-similarity) compare the batch's embeddings with each other and take a miner, and want
P-K batches (:func:`pk_sampler`).

Written here, because PML does not have them: :class:`CurricularFaceLoss` (Huang et al.,
CVPR 2020) and the GLR-2021 dynamic margins (:func:`dynamic_margins`,
:class:`DynamicSubCenterArcFaceLoss`: each class's ArcFace margin from its frequency).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import losses, miners, samplers
from torch import nn

from lookalike.errors import ConfigError


def dynamic_margins(
    counts: Sequence[int], low: float = 0.05, high: float = 0.5, power: float = 0.25
) -> np.ndarray:
    """Per-class ArcFace margins (radians) from the classes' image counts, as the Google
    Landmark 2020/2021 winners set them: ``m = a * n^(-power) + b``, with ``a`` and ``b``
    chosen so that the rarest class gets ``high`` and the most frequent ``low`` (every class
    gets ``high`` when all counts are equal).

    Raises:
        ConfigError: a count below 1, or ``low > high``.
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or (n < 1).any():
        raise ConfigError(f"class counts must be at least 1, got {list(counts)[:10]}")
    if not 0 <= low <= high:
        raise ConfigError(f"dynamic margins need 0 <= low <= high, got {low}, {high}")
    v = n**-power
    spread = v.max() - v.min()
    if spread == 0:
        return np.full(len(n), high, dtype=np.float32)
    return (low + (high - low) * (v - v.min()) / spread).astype(np.float32)


class DynamicSubCenterArcFaceLoss(losses.SubCenterArcFaceLoss):
    """PML's sub-center ArcFace with one margin per class (:func:`dynamic_margins`).

    Args:
        margins: ``(classes,)`` margins in radians.
        **kwargs: as :class:`pytorch_metric_learning.losses.SubCenterArcFaceLoss`
            (``num_classes``, ``embedding_size``, ``scale``, ``sub_centers``).
    """

    def __init__(self, margins: np.ndarray, **kwargs: Any) -> None:
        margins = np.asarray(margins, dtype=np.float32)
        super().__init__(margin=float(np.degrees(margins.mean())), **kwargs)
        if margins.shape != (self.num_classes,):
            raise ConfigError(f"{margins.shape[0]} margins for {self.num_classes} classes")
        self.register_buffer("margins", torch.from_numpy(margins))
        self._labels: torch.Tensor | None = None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._labels = labels  # the target cosines come one per row, in the batch's order
        try:
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        finally:
            self._labels = None

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        m = self.margins.to(cosine_of_target_classes)[self._labels]
        angles = self.get_angles(cosine_of_target_classes)
        return torch.where(  # PML's ArcFace, per-sample margins: monotonic past pi - m
            angles <= math.pi - m, torch.cos(angles + m), torch.cos(angles) - m * torch.sin(m)
        )


class CurricularFaceLoss(nn.Module):
    """CurricularFace (Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for
    Deep Face Recognition", CVPR 2020), which PML lacks.

    The target logit is ArcFace's ``cos(theta_y + m)`` (``cos(theta_y) - m sin(m)`` past
    ``pi - m``, as in the authors' code); a non-target logit harder than the target's
    (``cos(theta_j) > cos(theta_y + m)``) becomes ``cos(theta_j) (t + cos(theta_j))``, where
    ``t`` follows the batches' mean target cosine (``t <- 0.01 mean + 0.99 t``, from 0):
    early in training (``t`` small) hard negatives weigh less, later more. Then softmax
    cross-entropy on ``scale`` times the logits.

    Args:
        num_classes: classes of the head.
        embedding_size: ``D``.
        margin: ``m`` in radians (paper: 0.5; the lookalike preset: 0.4).
        scale: ``s`` (paper: 64; the lookalike preset: 30).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.4, scale: float = 30.0
    ) -> None:
        super().__init__()
        self.margin, self.scale = float(margin), float(scale)
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.normal_(self.W, std=0.01)
        self.register_buffer("t", torch.zeros(()))

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The ``(B, classes)`` unscaled logits (updates ``t`` in training mode)."""
        cosine = nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(self.W, dim=0)
        cosine = cosine.clamp(-1, 1)
        target = cosine.gather(1, labels.view(-1, 1))
        m = self.margin
        sin = torch.sqrt((1.0 - target**2).clamp_min(0))
        target_m = target * math.cos(m) - sin * math.sin(m)  # cos(theta_y + m)
        final_target = torch.where(
            target > math.cos(math.pi - m), target_m, target - m * math.sin(m)
        )
        if self.training:
            with torch.no_grad():
                self.t.mul_(0.99).add_(0.01 * target.mean())
        hard = cosine > target_m
        out = torch.where(hard, cosine * (self.t + cosine), cosine)
        return out.scatter(1, labels.view(-1, 1), final_target)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, *_: object) -> torch.Tensor:
        return nn.functional.cross_entropy(self.scale * self.logits(embeddings, labels), labels)


# -- presets ----------------------------------------------------------------------------------

CLASSIFIER = "classifier"  # a head of per-class weights, trained with its own learning rate
PAIR = "pair"  # compares the batch's embeddings; P-K batches and a miner


@dataclass(frozen=True)
class LossConf:
    """A named loss: which one, its settings, its miner (pair losses)."""

    name: str
    kind: str  # CLASSIFIER or PAIR
    params: dict[str, Any] = field(default_factory=dict)
    miner: str | None = None
    miner_params: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> LossConf:
        return dataclasses.replace(self, **changes)


LOSS_PRESETS: dict[str, LossConf] = {
    "arcface": LossConf("arcface", CLASSIFIER, {"margin": 28.6, "scale": 30.0}),
    "cosface": LossConf("cosface", CLASSIFIER, {"margin": 0.35, "scale": 30.0}),
    "subcenter-dynamic": LossConf(
        "subcenter-dynamic", CLASSIFIER, {"low": 0.05, "high": 0.5, "scale": 30.0, "sub_centers": 3}
    ),
    "curricularface": LossConf("curricularface", CLASSIFIER, {"margin": 0.4, "scale": 30.0}),
    "triplet": LossConf(
        "triplet", PAIR, {"margin": 0.1}, "triplet", {"margin": 0.1, "type_of_triplets": "semihard"}
    ),
    "triplet-hard": LossConf("triplet-hard", PAIR, {"margin": 0.1}, "batch-hard", {}),
    "multisimilarity": LossConf(
        "multisimilarity",
        PAIR,
        {"alpha": 2.0, "beta": 50.0, "base": 0.5},
        "multisimilarity",
        {"epsilon": 0.1},
    ),
    # PML's contrastive loss and pair-margin miner measure Euclidean distances (0..2 between
    # unit vectors): positives pulled together whatever their distance, negatives pushed
    # past 1 (cosine below 0.5); the miner keeps positives farther than 0.2 and negatives
    # nearer than 0.8 (PML's defaults for both)
    "contrastive": LossConf(
        "contrastive",
        PAIR,
        {"pos_margin": 0.0, "neg_margin": 1.0},
        "pair-margin",
        {"pos_margin": 0.2, "neg_margin": 0.8},
    ),
    "npair": LossConf("npair", PAIR),
}


def loss_preset(name: str) -> LossConf:
    """The preset ``name``; ``ConfigError`` naming the valid ones."""
    try:
        return LOSS_PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown loss preset {name!r}; choose one of {', '.join(LOSS_PRESETS)}"
        ) from None


def build_loss(
    conf: LossConf, num_classes: int, dim: int, class_counts: Sequence[int] | None = None
) -> tuple[nn.Module, miners.BaseMiner | None]:
    """``(loss, miner or None)`` for ``conf``.

    Args:
        conf: the loss settings (:data:`LOSS_PRESETS`).
        num_classes: classes in the training set (classifier losses).
        dim: embedding size (classifier losses).
        class_counts: images per class, by class index (``subcenter-dynamic``).
    """
    p = dict(conf.params)
    if conf.name == "arcface":
        loss: nn.Module = losses.ArcFaceLoss(num_classes, dim, **p)
    elif conf.name == "cosface":
        loss = losses.CosFaceLoss(num_classes, dim, **p)
    elif conf.name == "subcenter-dynamic":
        if class_counts is None or len(class_counts) != num_classes:
            raise ConfigError("subcenter-dynamic needs the image count of every class")
        margins = dynamic_margins(class_counts, p.pop("low"), p.pop("high"))
        loss = DynamicSubCenterArcFaceLoss(
            margins, num_classes=num_classes, embedding_size=dim, **p
        )
    elif conf.name == "curricularface":
        loss = CurricularFaceLoss(num_classes, dim, **p)
    elif conf.name in ("triplet", "triplet-hard"):
        loss = losses.TripletMarginLoss(**p)
    elif conf.name == "multisimilarity":
        loss = losses.MultiSimilarityLoss(**p)
    elif conf.name == "contrastive":
        loss = losses.ContrastiveLoss(**p)
    elif conf.name == "npair":
        loss = losses.NPairsLoss(**p)
    else:
        raise ConfigError(f"unknown loss {conf.name!r}")
    return loss, _miner(conf)


def _miner(conf: LossConf) -> miners.BaseMiner | None:
    if conf.miner is None:
        return None
    p = dict(conf.miner_params)
    if conf.miner == "triplet":
        return miners.TripletMarginMiner(**p)
    if conf.miner == "batch-hard":
        return miners.BatchHardMiner(**p)
    if conf.miner == "multisimilarity":
        return miners.MultiSimilarityMiner(**p)
    if conf.miner == "pair-margin":
        return miners.PairMarginMiner(**p)
    raise ConfigError(f"unknown miner {conf.miner!r}")


def pk_sampler(labels: Sequence[int], k: int, batch_size: int, seed: int | None = None):
    """PML's ``MPerClassSampler``: batches of ``batch_size // k`` classes with ``k`` images
    each (a class with fewer than ``k`` images repeats some). ``seed`` gives PML's random
    state (``common_functions.NUMPY_RANDOM``, which the sampler draws from) a generator of
    its own, for repeatable batches."""
    if batch_size % k:
        raise ConfigError(f"the batch size ({batch_size}) must be a multiple of k ({k})")
    if len(set(labels)) < batch_size // k:
        raise ConfigError(
            f"P-K batches of {batch_size // k} classes need at least as many classes, "
            f"got {len(set(labels))}"
        )
    if seed is not None:
        from pytorch_metric_learning.utils import common_functions

        common_functions.NUMPY_RANDOM = np.random.RandomState(seed)
    return samplers.MPerClassSampler(
        list(labels), m=k, batch_size=batch_size, length_before_new_iter=len(labels)
    )


def epoch_batches(
    labels: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    k: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[list[int]]:
    """The batches of one epoch, from ``(seed, epoch)`` alone: a shuffle, or P-K batches
    (``k`` images of each of ``batch_size // k`` classes, :func:`pk_sampler`). Incomplete
    batches are dropped (batch norm needs full ones).

    With several processes (``world`` > 1, distributed data parallel) every process computes
    the same list and keeps every ``world``-th batch from its ``rank``: the P-K structure holds
    in each process's batches, which PML's sampler alone does not give under a
    ``DistributedSampler``; all processes get the same number of batches.
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, world), got rank {rank} of {world}")
    mixed = seed * 1_000_003 + epoch
    if k is None:
        generator = torch.Generator().manual_seed(mixed)
        order = torch.randperm(len(labels), generator=generator).tolist()
    else:
        order = list(iter(pk_sampler(labels, k, batch_size, mixed)))
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


__all__ = [
    "CLASSIFIER",
    "LOSS_PRESETS",
    "PAIR",
    "CurricularFaceLoss",
    "DynamicSubCenterArcFaceLoss",
    "LossConf",
    "build_loss",
    "dynamic_margins",
    "epoch_batches",
    "loss_preset",
    "pk_sampler",
]
