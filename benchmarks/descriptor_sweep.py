"""How the default descriptor preset was chosen: pooling x image size x whitening x query
rotations on Holidays and Oxford5k (845), from feature maps computed once per size.

    .venv/bin/python benchmarks/descriptor_sweep.py --data ../shared/data

Prints one mAP table per data set. Each configuration is scored on the same feature maps,
so the differences are the descriptor choices alone. Whitening is learned on the indexed
collection itself, as `lookalike index` does (from global or regional descriptors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lookalike.evaluate import apply_exclusions, evaluate_rankings, load_dataset
from lookalike.extract import ExtractConf, Extractor
from lookalike.functional import l2n
from lookalike.images import load_image
from lookalike.pooling import create_pooling
from lookalike.whitening import WhiteningConf, learn_whitening

POOLINGS = ("gap", "mac", "gem", "rmac")
WHITENINGS = {
    "none": None,
    "global full": ("global", WhiteningConf()),
    "global 256-d": ("global", WhiteningConf(dim=256)),
    "regional shrink.3 pow.2": ("regions", WhiteningConf(shrinkage=0.3, power=0.2)),
    "regional shrink.3 pow.2 256-d": ("regions", WhiteningConf(dim=256, shrinkage=0.3, power=0.2)),
}


def feature_maps(extractor: Extractor, dataset, size: int, rotations=(0,)) -> dict:
    """Backbone feature maps of the database and of every query view, at long side ``size``."""

    def run(path, box=None, rot=0) -> torch.Tensor:
        img = np.asarray(load_image(path, size, box=box))
        img = np.ascontiguousarray(np.rot90(img, k=rot // 90))
        return extractor.runner(extractor._normalise([img]))

    db = [run(p) for p in dataset.images]
    queries = {rot: [run(q.image, q.box, rot) for q in dataset.queries] for rot in rotations}
    return {"db": db, "q": queries}


def describe(maps: list[torch.Tensor], pooling: str) -> np.ndarray:
    pool = create_pooling(pooling)
    return np.concatenate([l2n(pool(m)).numpy() for m in maps])


def regions(maps: list[torch.Tensor]) -> np.ndarray:
    pool = create_pooling("rmac")
    return np.concatenate([pool.regions(m)[0].numpy() for m in maps])


def mean_ap(dataset, sims: np.ndarray) -> float:
    rankings = [
        apply_exclusions(np.argsort(-s), q) for s, q in zip(sims, dataset.queries, strict=True)
    ]
    return evaluate_rankings(
        rankings, [q.positives for q in dataset.queries], [q.junk for q in dataset.queries]
    )["mAP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sizes", default="400,512,640")
    args = parser.parse_args()
    extractor = Extractor(ExtractConf(whitening=None, workers=0))
    for name in ("holidays", "oxford5k"):
        dataset = load_dataset(name, args.data / name)
        print(f"\n{name}: mAP (%) by long side / pooling / whitening; rotations 0,90,270 last")
        for size in map(int, args.sizes.split(",")):
            maps = feature_maps(extractor, dataset, size, rotations=(0, 90, 270))
            for pooling in POOLINGS:
                x = describe(maps["db"], pooling)
                qs = {rot: describe(m, pooling) for rot, m in maps["q"].items()}
                cells = []
                for wname, spec in WHITENINGS.items():
                    if spec is None:
                        w = None
                    else:
                        source = regions(maps["db"]) if spec[0] == "regions" else x
                        w = learn_whitening(source, spec[1])
                    xw = x if w is None else w.apply(x)
                    views = {r: (q if w is None else w.apply(q)) for r, q in qs.items()}
                    upright = views[0] @ xw.T
                    rotated = np.maximum(views[90] @ xw.T, views[270] @ xw.T)
                    cells.append(f"{wname}: {mean_ap(dataset, upright):5.1f}")
                    for pen in (0.0, 0.05):
                        fused = np.maximum(upright, rotated - pen)
                        cells.append(f"+rot(pen {pen}) {mean_ap(dataset, fused):5.1f}")
                print(f"  {size:4d} {pooling:5s} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
