"""Local features and geometric verification: extract, store, match, verify, draw.

``features`` holds the extractor registry (:data:`LOCAL_FEATURES`), ``matching`` the pure
matching and RANSAC functions, ``store`` the compact per-index storage and ``draw`` the
match overlay. Importing this package loads neither torch nor kornia (ALIKED imports them
when created).
"""

from __future__ import annotations

from lookalike.local.draw import draw_matches
from lookalike.local.features import (
    DESCRIPTORS,
    IMAGE_SIZE,
    KEYPOINTS,
    LOCAL_FEATURES,
    SCORES,
    LocalExtractor,
    create_local_extractor,
    default_local_settings,
)
from lookalike.local.matching import (
    FUSIONS,
    MATCHES,
    MATCHES0,
    Verification,
    fuse_scores,
    match_many,
    match_mutual_nn,
    verify,
    verify_pair,
)
from lookalike.local.store import LocalFeatureStore

__all__ = [
    "DESCRIPTORS",
    "FUSIONS",
    "IMAGE_SIZE",
    "KEYPOINTS",
    "LOCAL_FEATURES",
    "MATCHES",
    "MATCHES0",
    "SCORES",
    "LocalExtractor",
    "LocalFeatureStore",
    "Verification",
    "create_local_extractor",
    "default_local_settings",
    "draw_matches",
    "fuse_scores",
    "match_many",
    "match_mutual_nn",
    "verify",
    "verify_pair",
]
