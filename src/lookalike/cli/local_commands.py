"""``lookalike match A B --out PNG``: verify one pair of images and draw the inliers."""

from __future__ import annotations

import argparse
import json

from lookalike.cli.ui import Ui


def cmd_match(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.local.conf import default_local_features, local_conf
    from lookalike.local.pair import match_files

    if args.local is None:  # offline by default: aliked only when its weights are on disk
        conf = default_local_features(args.local_weights)
    else:
        conf = local_conf(args.local, weights=args.local_weights)
    a, b = args.images
    result = match_files(a, b, conf, args.out)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    v = result.verification
    n0, n1 = result.to_dict()["keypoints"]
    print(f"{a} <-> {b}")
    print(f"  features   {conf.features}: {n0} and {n1} keypoints")
    print(f"  matches    {v.tentative} (mutual nearest neighbours, ratio {conf.ratio})")
    print(f"  inliers    {v.inliers} ({conf.model}, {conf.method}, {conf.threshold_px:g} px)")
    if result.png is not None:
        print(f"  overlay    {result.png}")
    return 0
