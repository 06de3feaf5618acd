"""How local features are encoded on disk: descriptor dtype per extractor, keypoint scale,
and the record layout (:class:`RecordCodec`)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from lookalike.errors import ConfigError
from lookalike.local.features import DESCRIPTORS, IMAGE_SIZE, KEYPOINTS, SCORES, top_k

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


class RecordCodec:
    """Encodes one image's features as a record of the store and decodes it back.

    Args:
        name: extractor name (for messages); dim: descriptor length; binary: uint8 bit
            strings; max_keypoints: records keep the best this many; dtype / scale: the
            stored descriptor type and the factor floats are multiplied by before rounding
            to uint8 (None: stored as ``dtype`` directly).
    """

    def __init__(
        self,
        name: str,
        dim: int,
        binary: bool,
        max_keypoints: int,
        dtype: np.dtype,
        scale: float | None,
    ) -> None:
        self.name, self.dim, self.binary = name, dim, binary
        self.max_keypoints = max_keypoints
        self._dtype, self._scale = np.dtype(dtype), scale

    def record_bytes(self, n: int) -> int:
        """Bytes of a record of ``n`` keypoints, padding included."""
        raw = n * (4 + 2 + self.dim * self._dtype.itemsize)
        return (raw + 7) // 8 * 8

    def encode(self, feats: dict) -> tuple[bytes, int, int, int]:
        """``(record, n, width, height)``; ``ValueError`` for malformed features."""
        if not isinstance(feats, dict):
            raise ValueError(f"features must be a dict, got {type(feats).__name__}")
        try:
            kpts = np.asarray(feats[KEYPOINTS], dtype=np.float32)
            desc = np.asarray(feats[DESCRIPTORS])
            width, height = (int(v) for v in feats[IMAGE_SIZE])
        except KeyError as error:
            raise ValueError(f"features lack the {error.args[0]!r} entry") from None
        n = len(kpts)
        scores = np.asarray(feats.get(SCORES, np.zeros(n)), dtype=np.float32)
        if kpts.ndim != 2 or kpts.shape[1] != 2 or scores.shape != (n,):
            raise ValueError(
                f"keypoints must be (N, 2) and scores (N,), got {kpts.shape}, {scores.shape}"
            )
        if desc.shape != (n, self.dim):
            raise ValueError(f"descriptors must be ({n}, {self.dim}), got {desc.shape}")
        if self.binary != (desc.dtype == np.uint8):
            raise ValueError(
                f"{self.name} descriptors must be {'uint8' if self.binary else 'float'}, got "
                f"{desc.dtype}"
            )
        if n and (width < 1 or height < 1):
            raise ValueError(f"image_size must be positive (width, height), got {width, height}")
        if not (np.isfinite(kpts).all() and np.isfinite(scores).all()):
            raise ValueError("keypoints and scores must be finite")
        # best first, so that the first k keypoints of a record are its top k
        keep = top_k(scores, self.max_keypoints)
        kpts, scores, desc, n = kpts[keep], scores[keep], desc[keep], len(keep)
        size = np.array([width, height], np.float32)
        kq = np.clip(np.rint((kpts + 0.5) / size * KPT_SCALE), 0, KPT_SCALE).astype(np.uint16)
        if self._dtype == np.uint8 and not self.binary:
            desc = np.clip(np.rint(desc.astype(np.float32) * self._scale), 0, 255)
        parts = [
            kq.tobytes(),
            scores.astype(np.float16).tobytes(),
            desc.astype(self._dtype).tobytes(),
        ]
        record = b"".join(parts)
        return record + bytes(self.record_bytes(n) - len(record)), n, width, height

    def decode(self, buf: np.ndarray, n: int, width: int, height: int, k: int) -> dict:
        """The feature dict of the first ``k`` keypoints of a record of ``n``."""
        row = self.dim * self._dtype.itemsize
        kq = buf[: 4 * k].view(np.uint16).reshape(k, 2)
        scores = buf[4 * n : 4 * n + 2 * k].view(np.float16)
        desc = buf[6 * n : 6 * n + k * row].view(self._dtype).reshape(k, self.dim)
        size = np.array([width, height], np.float32)
        kpts = kq.astype(np.float32) * (size / KPT_SCALE) - 0.5
        if not self.binary:
            desc = desc.astype(np.float32)
            if self._scale not in (None, 1.0):
                desc *= np.float32(1.0 / self._scale)
        else:
            desc = desc.copy()  # detach from the map, which a compaction may replace
        return {
            KEYPOINTS: kpts,
            DESCRIPTORS: desc,
            SCORES: scores.astype(np.float32),
            IMAGE_SIZE: (width, height),
        }
