"""Verify one pair of image files: what ``lookalike match A B --out PNG`` runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from lookalike.images import load_image
from lookalike.local.conf import VerifyConf, default_local_features
from lookalike.local.draw import draw_matches
from lookalike.local.features import KEYPOINTS, LocalExtractor
from lookalike.local.matching import Verification, verify_pair


@dataclass
class PairMatch:
    """The verification of two image files."""

    verification: Verification  # inliers, inlier matches, fitted model
    features: tuple[dict, dict]  # local features of image 0 and image 1 (original pixels)
    png: Path | None  # the overlay written, if asked for
    paths: tuple[str, str] = ("", "")  # the two image files, as given
    conf: VerifyConf = field(default_factory=VerifyConf)  # the settings they were matched with

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``lookalike match --json`` prints: images, features, keypoints per
        image, tentative matches, inliers, the fitted 3 x 3 model (None when none) and the
        overlay written."""
        v = self.verification
        return {
            "images": list(self.paths),
            "features": self.conf.features,
            "keypoints": [len(f[KEYPOINTS]) for f in self.features],
            "tentative": v.tentative,
            "inliers": v.inliers,
            "model": None if v.model is None else v.model.tolist(),
            "png": None if self.png is None else str(self.png),
        }


def match_files(
    path0: str | Path,
    path1: str | Path,
    conf: VerifyConf | None = None,
    out_png: str | Path | None = None,
    extractor: LocalExtractor | None = None,
) -> PairMatch:
    """Detect, match and verify two images; optionally draw their inlier matches.

    Args:
        path0, path1: image files (any format :func:`~lookalike.images.load_image` reads).
        conf: local features and matching settings (its ``features``, ``ratio``, ``model``,
            ``method`` and ``threshold_px`` apply); None:
            :func:`~lookalike.local.conf.default_local_features` (ALIKED when its weights are
            on disk, RootSIFT otherwise: nothing is downloaded).
        out_png: where to draw ``image0 | image1`` with a line per inlier match.
        extractor: a ready extractor for ``conf``.

    Raises:
        ImageError: a file cannot be read; ConfigError: bad settings or weights.
    """
    images = [load_image(p) for p in (path0, path1)]
    result = match_images(*images, conf, out_png, extractor)
    result.paths = (str(path0), str(path1))
    return result


def match_images(
    image0: Image.Image,
    image1: Image.Image,
    conf: VerifyConf | None = None,
    out_png: str | Path | BinaryIO | None = None,
    extractor: LocalExtractor | None = None,
) -> PairMatch:
    """:func:`match_files` for decoded images (RGB); ``out_png`` may be a binary stream
    (the service's ``/match`` overlay)."""
    conf = conf or default_local_features()
    images = [np.asarray(image) for image in (image0, image1)]
    extractor = extractor or conf.create_extractor()
    feats0, feats1 = (extractor(image) for image in images)
    result = verify_pair(
        feats0,
        feats1,
        ratio=conf.ratio,
        model=conf.model,
        method=conf.method,
        threshold_px=conf.threshold_px,
    )
    png = None
    if out_png is not None:
        title = (
            f"{result.inliers} inliers of {result.tentative} matches "
            f"({conf.features}, {conf.model})"
        )
        png = draw_matches(
            images[0],
            images[1],
            feats0[KEYPOINTS],
            feats1[KEYPOINTS],
            result.inlier_matches,
            out_png,
            title=title,
        )
    return PairMatch(result, (feats0, feats1), png if isinstance(png, Path) else None, conf=conf)
