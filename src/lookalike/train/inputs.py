"""What the training loop feeds the model: images decoded once (bad files skipped with
their reason), a fingerprint of their contents, the torchvision v2 augmentations, and the
descriptors of whole images as indexing computes them (validation)."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lookalike.images import decode_many
from lookalike.train.data import LabelledImages

logger = logging.getLogger(__name__)


@dataclass
class Decoded:
    """The usable images of a split, decoded once."""

    images: list[np.ndarray]  # (H, W, 3) uint8
    targets: list[int]
    hashes: list[str]
    skipped: list[dict]  # {"path", "error"}


def decode_split(images: LabelledImages, max_side: int, workers: int) -> Decoded:
    """Decode every image once at ``max_side`` (never enlarged); bad files are skipped."""
    out = Decoded([], [], [], [])
    for item in decode_many(images.paths, max_side, workers=workers):
        if item.error is not None:
            logger.warning("skipping %s: %s", item.path, item.error)
            out.skipped.append({"path": item.path, "error": item.error})
            continue
        out.images.append(item.image)
        out.targets.append(images.targets[item.index])
        out.hashes.append(item.content_hash or "")
    return out


def fingerprint(decoded: Decoded, classes: Sequence[str]) -> str:
    """A hash of the images' contents and labels, independent of paths and order."""
    rows = sorted(f"{h} {classes[t]}" for h, t in zip(decoded.hashes, decoded.targets, strict=True))
    return hashlib.blake2b("\n".join(rows).encode(), digest_size=12).hexdigest()


def augmentation(size: int, mean: Sequence[float], std: Sequence[float], augment: bool):
    """The torchvision v2 transform of a training image (a ``(3, H, W)`` uint8 tensor)."""
    from torchvision.transforms import v2

    if augment:
        # no hue jitter: hue is what tells two apple varieties apart
        steps = [
            v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.RandomErasing(p=0.25, scale=(0.02, 0.15)),  # cutout
        ]
    else:
        steps = [
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    return v2.Compose(steps)


@torch.inference_mode()
def embed_images(
    model: torch.nn.Module, images: Sequence[np.ndarray], device: torch.device, batch_size: int = 16
) -> np.ndarray:
    """``(N, dim)`` descriptors of decoded images with ``model`` in eval mode (images of one
    shape are batched together); the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    mean = torch.tensor(model.backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.std).view(1, 3, 1, 1)
    out = np.zeros((len(images), model.dim), np.float32)
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_shape[img.shape].append(i)
    try:
        for rows in by_shape.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                x = torch.from_numpy(np.stack([images[i] for i in chunk])).permute(0, 3, 1, 2)
                x = (x.float() / 255.0 - mean) / std
                out[chunk] = model(x.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


__all__ = ["Decoded", "augmentation", "decode_split", "embed_images", "fingerprint"]
