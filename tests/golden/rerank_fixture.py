"""A fixed index for the re-ranking golden test: clustered synthetic vectors over real files.

Every image is a real file (so verification can compute local features from it), but its
global descriptor is a synthetic vector: 30 clusters of 4 members (a photo crop and three
near-duplicates share a cluster centre), so query expansion and DBA really move results.
Everything is seeded; building it twice gives the same index bit for bit.

Used by ``make_rerank_golden.py`` (run once against the code the golden file was made
with) and by ``tests/test_rerank_golden.py`` (the code of today).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_CLUSTERS = 30
PER_CLUSTER = 4
D = 32
DESCRIPTOR = {"model": "efficientnet_lite0", "pooling": "gem", "scales": [1.0]}
ID_QUERIES = (1, 6, 17, 33, 58, 77, 100, 119)
N_VECTOR_QUERIES = 6
K_VALUES = (5, 0)
# --rerank lists, as Searcher took them; "verify" uses VERIFY below
PIPELINES = (
    (),
    ("aqe",),
    ("alpha-qe",),
    ("dba",),
    ("dba+aqe",),
    ("dba", "alpha-qe"),
    ("alpha-qe", "dba"),
    ("aqe", "alpha-qe"),
    ("verify",),
    ("alpha-qe", "verify"),
    ("dba", "alpha-qe", "verify"),
)
VERIFY = {
    "features": "rootsift",
    "max_keypoints": 128,
    "max_side": 128,
    "ratio": 0.85,
    "threshold_px": 6.0,
    "budget": 12,
}


def vectors(seed: int = 7) -> np.ndarray:
    """``(120, 32)`` float32 unit vectors, row ``i`` for image ``i`` (id ``i + 1``)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CLUSTERS, D))
    spread = rng.uniform(0.4, 1.2, size=(N_CLUSTERS * PER_CLUSTER, 1))
    noise = rng.standard_normal((N_CLUSTERS * PER_CLUSTER, D)) * spread
    x = np.repeat(centres, PER_CLUSTER, axis=0) + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vector_queries(seed: int = 8) -> np.ndarray:
    """``(6, 32)`` float32 unit vectors near some cluster centres (not in the index)."""
    x = vectors()
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(x), N_VECTOR_QUERIES, replace=False)
    q = x[rows] + 0.5 * rng.standard_normal((N_VECTOR_QUERIES, D))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def write_files(folder: Path) -> list[Path]:
    """The 120 image files: per cluster one photo crop and three near-duplicates of it."""
    from conftest import distinct_image, near_duplicate

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c in range(N_CLUSTERS):
        base = distinct_image(c, side=96)
        for m in range(PER_CLUSTER):
            img = base if m == 0 else near_duplicate(base, m)
            path = folder / f"c{c:02d}_{m}.png"
            img.save(path)
            paths.append(path)
    return paths
