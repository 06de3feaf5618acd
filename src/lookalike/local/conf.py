"""Settings of geometric verification: which local features, how they are matched and fused.

:class:`VerifyConf` has two halves. The *feature* fields (``features``, ``max_keypoints``,
``max_side``, ``weights``) define what an index stores under ``<index>/local`` and are fixed
when the index is built with ``lookalike index --local NAME``; the *matching* fields
(``ratio`` .. ``fusion``) apply at query time and may change from one search to the next.

Presets were chosen with ``benchmarks/verify.py`` (tables in docs/benchmarks.md): ALIKED at
512 px with 512 keypoints, ratio 0.9 and a 16 px homography threshold re-ranks Oxford5k's
top 100 from 69.7 to 81.6 mAP at ~125 ms per query; RootSIFT at 1024 px is the best on
Holidays (93.5) but 3-4x slower to match and worse on Oxford (76.4).

Nothing is downloaded by default: :func:`default_local_features` picks ALIKED when its
weights are on this machine and RootSIFT otherwise, for ``lookalike match`` and for
verifying an index that keeps no local features.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.errors import ConfigError
from lookalike.local.features import (
    aliked_cached_weights,
    default_local_settings,
    local_feature_class,
)
from lookalike.local.matching import FUSIONS, METHODS, MIN_MATCHES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyConf:
    """Local features and geometric verification of a shortlist."""

    # -- features: fixed per index (stored in <index>/local) -------------------------------
    features: str = "aliked"  # local extractor, a LOCAL_FEATURES key
    max_keypoints: int = 512  # keypoints kept per image, best score first
    max_side: int = 512  # long side, px, the detector sees; a cropped query is detected at
    #   the scale of its whole image
    weights: str | None = None  # ALIKED checkpoint (aliked-n16.pth); None: kornia downloads
    #   the official one on first use (needs internet)
    # -- matching: query time ---------------------------------------------------------------
    ratio: float = 0.9  # Lowe's ratio on descriptor distances; 1.0 switches the test off
    model: str = "homography"  # geometric model: "homography" or "fundamental"
    method: str = "magsac"  # robust estimator, a key of local.matching.METHODS
    threshold_px: float = 16.0  # inlier threshold, pixels of the candidate's original image
    budget: int = 100  # top candidates verified; the others keep their order below them
    fusion: str = "sim_plus_inliers"  # how similarity and inliers make the score, a FUSIONS
    #   key ("sim_sqrt_inliers" is similarity * sqrt(inliers))
    device: str = "cpu"  # where a learned extractor runs: "cpu", "cuda", "auto"
    query_side: int | None = None  # long side, px, a query photo is detected at (up- or
    #   downscaled); None: the scale its whole image is described at in the index (max_side)
    query_keypoints: int | None = None  # keypoints kept for a query; None: max_keypoints

    def __post_init__(self) -> None:
        local_feature_class(self.features)  # unknown names list the valid ones
        for name in ("max_keypoints", "max_side", "budget", "query_side", "query_keypoints"):
            value = getattr(self, name)
            if value is None and name.startswith("query_"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_side", "query_side"):
            value = getattr(self, name)
            if value is not None and value < 32:
                raise ConfigError(f"{name} must be at least 32 pixels, got {value}")
        if not (isinstance(self.ratio, int | float) and 0.0 < self.ratio <= 1.0):
            raise ConfigError(f"ratio must be in (0, 1] (1 switches it off), got {self.ratio!r}")
        if self.model not in MIN_MATCHES:
            raise ConfigError(f"unknown model {self.model!r}; valid: {', '.join(MIN_MATCHES)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if not (isinstance(self.threshold_px, int | float) and self.threshold_px > 0):
            raise ConfigError(f"threshold_px must be positive, got {self.threshold_px!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {self.fusion!r}; valid: {', '.join(FUSIONS)}")
        if self.weights is not None and not self.features.startswith("aliked"):
            raise ConfigError(f"local features {self.features!r} take no weights (only aliked)")

    def replace(self, **changes: Any) -> VerifyConf:
        """A copy with ``changes``; an unknown field raises ``ConfigError``."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ConfigError(f"unknown verify settings {unknown}; valid: {sorted(fields)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerifyConf:
        """The inverse of :meth:`to_dict`; unknown keys raise ``ConfigError``."""
        return cls().replace(**data)

    def feature_settings(self) -> dict[str, Any]:
        """:meth:`LocalExtractor.settings` of the extractor this makes (without building it)."""
        settings = default_local_settings(self.features)
        settings.update(max_keypoints=self.max_keypoints, max_side=self.max_side)
        return settings

    def query_detection(self) -> tuple[int | None, int]:
        """``(long side or None, keypoints)`` a query photo is detected with."""
        return self.query_side, self.query_keypoints or self.max_keypoints

    @property
    def quantize(self) -> bool:
        """Whether the stored descriptors are quantised (RootSIFT as uint8: lossless enough)."""
        return self.features == "rootsift"

    def create_extractor(self, max_keypoints: int | None = None, max_side: int | None = None):
        """The local feature extractor these settings describe (``max_keypoints``,
        ``max_side``: another budget and size, for queries). Returns a ``LocalExtractor``
        (imported lazily: it keeps torch out)."""
        from lookalike.local.features import create_local_extractor

        weights = Path(self.weights).expanduser() if self.weights else None
        return create_local_extractor(
            self.features,
            max_keypoints or self.max_keypoints,
            max_side or self.max_side,
            self.device,
            weights,
        )


VERIFY_PRESETS: dict[str, VerifyConf] = {
    # best on Oxford5k and 4x cheaper to match than RootSIFT@1024 (benchmarks/verify.py)
    "default": VerifyConf(),
    # the default fused by similarity * sqrt(inliers), for comparison: 0.8 mAP below the
    # default on Oxford5k
    "sqrt-inliers": VerifyConf(fusion="sim_sqrt_inliers"),
    # no learned weights needed; best on Holidays (93.5), 76.4 on Oxford, ~330-480 ms/query
    "rootsift": VerifyConf(features="rootsift", max_keypoints=1024, max_side=1024, ratio=0.8),
}


def get_verify_preset(name: str) -> VerifyConf:
    """A :data:`VERIFY_PRESETS` entry; ``ConfigError`` listing the names otherwise."""
    try:
        return VERIFY_PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown verify preset {name!r}; valid: {', '.join(VERIFY_PRESETS)}"
        ) from None


def local_preset(features: str) -> VerifyConf:
    """The preset for local features ``features``: ``default`` for aliked, ``rootsift`` for
    rootsift, else the default settings with those features."""
    for conf in VERIFY_PRESETS.values():
        if conf.features == features:
            return conf
    return VerifyConf(features=features)


def default_local_features(weights: str | Path | None = None) -> VerifyConf:
    """The local features used when none are asked for, without a download: the
    ``default`` preset (ALIKED, the measured best) when its weights are on disk (``weights``,
    or torch's hub cache ``checkpoints/aliked-n16.pth``), else the ``rootsift`` preset.

    Raises:
        ConfigError: ``weights`` is given but is no file.
    """
    if weights is not None:
        return VERIFY_PRESETS["default"].replace(weights=_weights_path(weights))
    if aliked_cached_weights() is not None:
        return VERIFY_PRESETS["default"]
    logger.info(
        "local features: rootsift (no ALIKED weights on this machine; give --local-weights "
        "aliked-n16.pth, or --local aliked to download them, for ALIKED)"
    )
    return VERIFY_PRESETS["rootsift"]


def _weights_path(weights: str | Path | None) -> str | None:
    if weights is None:
        return None
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"local-feature weights {weights}: no such file (--local-weights)")
    return str(path)


def local_conf(
    features: str | None,
    max_keypoints: int | None = None,
    max_side: int | None = None,
    weights: str | Path | None = None,
    device: str | None = None,
) -> VerifyConf | None:
    """What ``index --local NAME`` asks an index to store: the preset of ``features`` with
    the given changes; None without ``features``.

    Raises:
        ConfigError: changes without ``features``, a missing weights file, bad values.
    """
    if features is None:
        given = [
            name
            for name, value in (
                ("--local-keypoints", max_keypoints),
                ("--local-side", max_side),
                ("--local-weights", weights),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} need --local NAME")
        return None
    changes = {
        "max_keypoints": max_keypoints,
        "max_side": max_side,
        "weights": _weights_path(weights),
        "device": device,
    }
    return local_preset(features).replace(**{k: v for k, v in changes.items() if v is not None})


def verify_changes(
    features: str | None = None,
    weights: str | Path | None = None,
    budget: int | None = None,
    fusion: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The changes a search asks of an index's recorded verification settings (what
    :func:`lookalike.rerank.verify.resolve_conf` applies): ``features`` (their preset, for an
    index that stores none; the index's own otherwise), weights, budget, fusion, device."""
    changes: dict[str, Any] = {}
    if device is not None:
        changes["device"] = device
    if features is not None:
        local_feature_class(features)  # an unknown name fails here, listing the valid ones
        changes["features"] = features
    if weights is not None:
        changes["weights"] = _weights_path(weights)
    if budget is not None:
        changes["budget"] = budget
    if fusion is not None:
        changes["fusion"] = fusion
    return changes
