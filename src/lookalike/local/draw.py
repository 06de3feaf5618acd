"""A picture of the verified matches of two images: side by side, one line per inlier."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from lookalike.local.features import as_rgb_array

logger = logging.getLogger(__name__)


def _fit_height(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """``image`` resized to ``height`` rows, and the scale applied."""
    scale = height / image.shape[0]
    if scale == 1.0:
        return image, 1.0
    width = max(1, round(image.shape[1] * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp), scale


def draw_matches(
    image0: np.ndarray | Image.Image,
    image1: np.ndarray | Image.Image,
    kpts0: np.ndarray,
    kpts1: np.ndarray,
    inlier_matches: np.ndarray,
    out_png: str | Path | BinaryIO,
    title: str | None = None,
    max_height: int = 768,
    gap: int = 8,
) -> Path:
    """Write ``image0 | image1`` with a line joining each inlier pair to ``out_png``.

    Both images are scaled to a common height (at most ``max_height`` px); lines take
    colours from a fixed palette so that neighbouring matches are told apart.

    Args:
        image0, image1: ``(H, W, 3)`` uint8 RGB arrays or PIL images, the ones the
            keypoints were detected in.
        kpts0, kpts1: ``(N0, 2)`` / ``(N1, 2)`` x, y pixels.
        inlier_matches: ``(I, 2)`` int pairs ``(i0, i1)`` (e.g. ``Verification.inlier_matches``).
        out_png: the file to write (parent folders are created), or a binary stream.
        title: text drawn in the top-left corner, e.g. ``"132 inliers"``.
        max_height: height of the picture without the title band, pixels.
        gap: white pixels between the two images.

    Returns:
        The path written (the stream, for a stream).
    """
    a, b = as_rgb_array(image0), as_rgb_array(image1)
    height = min(max(a.shape[0], b.shape[0]), int(max_height))
    a, sa = _fit_height(a, height)
    b, sb = _fit_height(b, height)
    canvas = np.full((height, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[:, : a.shape[1]] = a
    canvas[:, a.shape[1] + gap :] = b
    matches = np.asarray(inlier_matches, np.int64).reshape(-1, 2)
    p0 = (np.asarray(kpts0, np.float64).reshape(-1, 2)[matches[:, 0]] + 0.5) * sa - 0.5
    p1 = (np.asarray(kpts1, np.float64).reshape(-1, 2)[matches[:, 1]] + 0.5) * sb - 0.5
    p1[:, 0] += a.shape[1] + gap
    rng = np.random.default_rng(0)
    colours = rng.integers(64, 256, size=(max(len(matches), 1), 3))
    for (x0, y0), (x1, y1), colour in zip(p0, p1, colours, strict=False):
        c = tuple(int(v) for v in colour)
        pt0, pt1 = (round(x0), round(y0)), (round(x1), round(y1))
        cv2.line(canvas, pt0, pt1, c, 1, cv2.LINE_AA)
        cv2.circle(canvas, pt0, 2, c, -1, cv2.LINE_AA)
        cv2.circle(canvas, pt1, 2, c, -1, cv2.LINE_AA)
    if title:
        band = np.full((28, canvas.shape[1], 3), 255, np.uint8)
        cv2.putText(band, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        canvas = np.vstack([band, canvas])
    out = out_png if hasattr(out_png, "write") else Path(out_png)
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out, format="PNG")
    logger.debug("drew %d matches", len(matches))
    return out
