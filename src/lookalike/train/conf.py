"""How a training run goes: :class:`TrainConf` and the named presets.

``TRAIN_PRESETS["default"]`` was chosen by measurement on the Grocery Store validation
split (``benchmarks/train.py``, docs/benchmarks.md); ``quick`` is a one-epoch smoke run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from lookalike.errors import ConfigError
from lookalike.train.losses import LOSS_PRESETS
from lookalike.train.model import POOLINGS

# WiSE-FT (Wortsman et al., CVPR 2022) mixes the fine-tuned backbone with the one training
# started from. On Grocery (benchmarks/train.py --stages wise, docs/benchmarks.md) 0.7 keeps
# most of the gain on the trained classes (P@1 84.8 against 85.5 unmixed) and wins back
# classes training never saw (mAP@R 62.7 against 60.4) and other domains (Holidays +5).
WISE = 0.7


@dataclass(frozen=True)
class TrainConf:
    """A training run's settings. Frozen and validated: a misspelled field is an error."""

    model: str = "efficientnet_lite0"  # MODELS key or any timm name
    weights: str | None = None  # local checkpoint path of the backbone; None: packaged / hub
    pooling: str = "gem"  # gem (p learned), rgem (regional GeM, p learned) or rmac
    gem_p: float = 3.0  # GeM's starting p
    dim: int | None = 512  # projection (linear + batch norm) size; None: no projection
    loss: str = "arcface"  # a LOSS_PRESETS key
    sizes: tuple[tuple[int, int], ...] = ((224, 8), (288, 3))  # (square crop px, epochs)
    freeze_epochs: int = 1  # first epochs with the backbone frozen (head only)
    frozen_stages: int = 4  # the backbone's first stages (stem, blocks) frozen throughout;
    #   4 on Lite0: the stem and blocks 0-2, 3x faster steps on this CPU
    batch_size: int = 32
    k_per_class: int = 4  # images per class in a P-K batch (pair losses)
    lr: float = 2e-4  # the backbone's peak learning rate (AdamW)
    head_lr: float = 2e-3  # pooling, projection and the loss's classifier weights
    weight_decay: float = 1e-4
    warmup: float = 0.1  # fraction of a group's training steps spent warming up
    clip_grad: float = 5.0  # gradient norm clipping; 0 is off
    augment: bool = True  # random resized crop, flip, colour jitter, cutout
    wise: float = WISE  # weight-space ensembling (WiSE-FT): the saved backbone is
    #   (1 - wise) * its starting weights + wise * the fine-tuned ones; 1.0 keeps the fine-tuned
    index_size: int = 512  # long side images are described at after training (no upscale)
    val_fraction: float = 0.1  # held out per class when no validation folder is given
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    amp: bool = True  # float16 autocast on CUDA (no effect on the CPU)
    workers: int = 1  # decoding processes (images are decoded once, then kept in memory)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; valid: {', '.join(POOLINGS)}")
        if self.loss not in LOSS_PRESETS:
            raise ConfigError(
                f"unknown loss preset {self.loss!r}; choose one of {', '.join(LOSS_PRESETS)}"
            )
        if not self.sizes or any(s < 32 or e < 1 for s, e in self.sizes):
            raise ConfigError(f"sizes must be (size >= 32, epochs >= 1) pairs, got {self.sizes}")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise ConfigError(
                f"freeze_epochs must be between 0 and the epochs ({self.epochs}), "
                f"got {self.freeze_epochs}"
            )
        if self.frozen_stages < 0:
            raise ConfigError(f"frozen_stages must be >= 0, got {self.frozen_stages}")
        if self.batch_size < 2 or self.k_per_class < 1 or self.batch_size % self.k_per_class:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be >= 2 and a multiple of k_per_class "
                f"({self.k_per_class})"
            )
        if min(self.lr, self.head_lr) <= 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ConfigError("learning rates must be > 0, weight_decay and clip_grad >= 0")
        if not 0 <= self.warmup < 1 or not 0 < self.val_fraction < 1:
            raise ConfigError("warmup must be in [0, 1) and val_fraction in (0, 1)")
        if not 0 < self.wise <= 1:
            raise ConfigError(f"wise must be in (0, 1], got {self.wise}")
        if self.index_size < 32 or (self.dim is not None and self.dim < 1):
            raise ConfigError("index_size must be >= 32 px and dim >= 1")

    @property
    def epochs(self) -> int:
        return sum(e for _, e in self.sizes)

    def size_of_epoch(self, epoch: int) -> int:
        """The crop size of epoch ``epoch`` (0-based)."""
        for size, count in self.sizes:
            if epoch < count:
                return size
            epoch -= count
        return self.sizes[-1][0]

    def replace(self, **changes: object) -> TrainConf:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sizes"] = [list(p) for p in self.sizes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConf:
        d = dict(d)
        d["sizes"] = tuple(tuple(p) for p in d.get("sizes", ()))
        try:
            return cls(**d)
        except TypeError as error:
            raise ConfigError(f"training settings not understood: {error}") from None


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"224:4,320:2"`` (size:epochs, comma-separated) -> ``((224, 4), (320, 2))``."""
    pairs = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m:
            raise ConfigError(f"--sizes takes size:epochs pairs like 224:4,320:2, got {text!r}")
        pairs.append((int(m[1]), int(m[2])))
    return tuple(pairs)


TRAIN_PRESETS: dict[str, TrainConf] = {
    "default": TrainConf(),
    # one short epoch: a smoke run, and what the tests and the demo train with
    "quick": TrainConf(sizes=((160, 1),), freeze_epochs=0),
    # the whole backbone trained (no stage kept frozen): slower, for large labelled sets
    "full": TrainConf(frozen_stages=0, sizes=((224, 4), (288, 1))),
}


def train_preset(name: str) -> TrainConf:
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; valid: {', '.join(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]


__all__ = ["TRAIN_PRESETS", "TrainConf", "parse_sizes", "train_preset"]
