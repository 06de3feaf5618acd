"""``lookalike index``, ``remove`` and ``info``: build, prune and describe an index.

Each parses, calls one function of :mod:`lookalike.indexing` and prints its result (a
summary, or ``--json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lookalike.cli.options import index_verify_conf, settings_of
from lookalike.cli.ui import Ui, print_warning

MAX_FAILED_SHOWN = 10  # failed files listed by `index` before "... and N more"
MAX_INFO_FAILED_SHOWN = 50  # the same for `info` (all of them with --json)


def cmd_index(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.indexing import index_folder
    from lookalike.labels import label_source

    # A bad label file is refused before any image is described.
    labels = label_source(args.label_from, args.dir) if args.label_from is not None else None
    settings = settings_of(args, args.index)
    local = index_verify_conf(args)
    with ui.bars() as bars:
        report = index_folder(
            args.dir,
            args.index,
            settings.extract,
            settings.index,
            remove_missing=args.remove_missing,
            labels=labels,
            progress=bars.callback("indexing", "img"),
            chunk=args.chunk,
            local=local,
            local_progress=bars.callback("local features", "img"),
        )
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0
    print(f"index {Path(args.index).expanduser().resolve()} <- {args.dir.expanduser().resolve()}")
    rows = [
        ("added", report.added),
        ("updated", report.updated),
        ("unchanged", report.unchanged),
        ("removed", report.removed) if args.remove_missing else ("missing", report.missing),
        ("failed", len(report.failed)),
    ]
    for key, value in rows:
        print(f"  {key:<10} {value}")
    for path, reason in report.failed[:MAX_FAILED_SHOWN]:
        print(f"    {path}: {reason}")
    if len(report.failed) > MAX_FAILED_SHOWN:
        print(f"    ... and {len(report.failed) - MAX_FAILED_SHOWN} more")
    if report.relabelled is not None:
        print(f"  {'relabelled':<10} {report.relabelled}")
        print(f"  {'labelled':<10} {report.labelled} images, {report.classes} classes")
    print(f"  {'seconds':<10} {report.seconds:.2f}")
    print(f"  {'images/s':<10} {report.images_per_second:.1f}")
    print(f"  {'whitening':<10} {'learned' if report.whitening_learned else 'not learned'}")
    if report.query_defaults_changed:
        rotations = ",".join(str(r) for r in settings.extract.query_rotations)
        crops = ",".join(str(c) for c in settings.extract.query_crops) or "none"
        print(
            f"  {'queries':<10} rotations {rotations}, crops {crops} recorded as this index's "
            "search defaults"
        )
    if report.local_described:
        print(f"  {'local':<10} {report.local_described} images described")
    if report.missing:
        print(f"  ({report.missing} indexed files are gone from disk; --remove-missing drops them)")
    if report.labelled == 0:
        print_warning(
            f"--label-from {args.label_from} gave no indexed image a label; check that its "
            f"paths name images under {args.dir}"
        )
    return 0


def cmd_remove(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.indexing import remove_images

    report = remove_images(args.index, ids=args.ids, paths=args.paths)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    removed, asked = report.removed, report.asked
    print(f"removed {removed} image{'s' if removed != 1 else ''} from {args.index}")
    if removed < asked:
        print(f"({asked - removed} of the {asked} given were not in the index)")
    return 0


def cmd_info(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.indexing import index_info

    info = index_info(args.index)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    d, counts, white = info["descriptor"], info["counts"], info["whitening"]
    if white.get("learned"):
        whitening = f"learned ({white.get('dim_out')}-d)"
    else:
        whitening = "off" if d.get("whitening") is None else "not learned yet"
    backend = info["backend"]
    rows = [
        ("index", f"{info['index']} (format {info['format_version']})"),
        ("model", f"{d.get('model')} (weights: {d.get('weights') or 'packaged'})"),
        ("weights", info["model"]["weights_hash"] or "hash not recorded yet"),
        ("pooling", d.get("pooling")),
        ("image size", f"{d.get('image_size')} px"),
        ("scales", ", ".join(str(s) for s in d.get("scales", []))),
        ("whitening", whitening),
        ("dim", info["dim"]),
        ("backend", f"{backend['backend']}: {backend['structure']}"),
        ("memory", f"{backend['memory_bytes'] / 1e6:.1f} MB"),
        (
            "queries",
            f"rotations {info['query']['rotations']}, crops {info['query']['crops'] or 'none'}",
        ),
        ("images", f"{counts.get('ok', 0)} ok, {counts.get('error', 0)} error"),
        ("created", info["created"]),
        ("updated", info["updated"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items())),
    ]
    if info["local"] is not None:
        loc = info["local"]
        ex = loc["extractor"]
        rows.append(
            (
                "local",
                f"{ex['name']} ({ex['max_keypoints']} keypoints at {ex['max_side']} px): "
                f"{loc['images']} images, {loc['bytes'] / 1e6:.1f} MB"
                + ("" if loc["recorded"] else " (cached by searches)"),
            )
        )
    if info["dba"] is not None:
        dba = info["dba"]
        rows.append(("dba", f"k={dba['k']} alpha={dba['alpha']}, {dba['bytes'] / 1e6:.1f} MB"))
    for key, value in rows:
        print(f"{key:<11} {value}")
    if info["failed"]:
        print(f"failed files ({len(info['failed'])}):")
        for row in info["failed"][:MAX_INFO_FAILED_SHOWN]:
            print(f"  [{row['id']}] {row['path']}: {row['error']}")
        if len(info["failed"]) > MAX_INFO_FAILED_SHOWN:
            print(f"  ... and {len(info['failed']) - MAX_INFO_FAILED_SHOWN} more (see --json)")
    return 0
