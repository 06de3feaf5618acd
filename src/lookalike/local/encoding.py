"""How local features are encoded on disk: descriptor dtype per extractor, keypoint scale."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from lookalike.errors import ConfigError

KPT_SCALE = 65535.0  # uint16 keypoint quantisation, relative to the image size
ROOTSIFT_SCALE = 512.0  # uint8 RootSIFT: components stay below 0.5, step 0.002


def storage_encoding(settings: dict, quantize: bool) -> dict[str, Any]:
    """How descriptors of an extractor are written: ``{"descriptors": dtype, "scale": s}``.

    ``scale`` multiplies float descriptors before rounding to uint8 (None: float16 or raw bits).
    """
    if settings.get("binary"):
        if quantize:
            raise ConfigError("quantize applies to float descriptors; binary ones are uint8")
        return {"descriptors": "uint8", "scale": None}
    if settings["name"] == "sift":  # OpenCV SIFT values are integers in 0..255
        return {"descriptors": "uint8", "scale": 1.0}
    if quantize:
        if settings["name"] != "rootsift":
            raise ConfigError(
                f"quantize=True stores non-negative RootSIFT as uint8; {settings['name']!r} "
                "descriptors stay float16"
            )
        return {"descriptors": "uint8", "scale": ROOTSIFT_SCALE}
    return {"descriptors": "float16", "scale": None}


def library_versions() -> dict[str, str]:
    import cv2

    import lookalike

    return {
        "lookalike": lookalike.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
