"""``lookalike index``, ``remove`` and ``info``: build, prune and describe an index.

``index --label-from folder|LABELS.csv`` labels the images for recognition: new and changed
files get their label as they are described, and the images of the folder that were
already indexed are relabelled in place (no descriptor is computed again).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.cli.options import extract_conf, index_conf, index_verify_conf, manifest_of
from lookalike.cli.ui import Ui, print_warning
from lookalike.errors import ConfigError

if TYPE_CHECKING:
    from lookalike.index import IndexStore

MAX_FAILED_SHOWN = 10  # failed files listed by `index` before "... and N more"
MAX_INFO_FAILED_SHOWN = 50  # the same for `info` (all of them with --json)


def cmd_index(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.indexing import index_folder
    from lookalike.labels import label_source

    # A bad label file is refused before any image is described.
    labels = label_source(args.label_from, args.dir) if args.label_from is not None else None
    manifest = manifest_of(args.index)
    _, conf = extract_conf(args, manifest)
    ic = index_conf(args, manifest)
    local = index_verify_conf(args)
    with ui.bars() as bars:
        report = index_folder(
            args.dir,
            args.index,
            conf,
            ic,
            remove_missing=args.remove_missing,
            metadata=labels,
            progress=bars.callback("indexing", "img"),
            chunk=args.chunk,
            local=local,
            local_progress=bars.callback("local features", "img"),
        )
    relabelled = relabel(args.index, args.dir, labels) if labels is not None else None
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
    if relabelled is not None:
        changed, labelled, classes = relabelled
        print(f"  {'relabelled':<10} {changed}")
        print(f"  {'labelled':<10} {labelled} images, {classes} classes")
    print(f"  {'seconds':<10} {report.seconds:.2f}")
    print(f"  {'images/s':<10} {report.images_per_second:.1f}")
    print(f"  {'whitening':<10} {'learned' if report.whitening_learned else 'not learned'}")
    if report.local_described:
        print(f"  {'local':<10} {report.local_described} images described")
    if report.missing:
        print(f"  ({report.missing} indexed files are gone from disk; --remove-missing drops them)")
    if relabelled is not None and relabelled[1] == 0:
        print_warning(
            f"--label-from {args.label_from} gave no indexed image a label; check that its "
            f"paths name images under {args.dir}"
        )
    return 0


def relabel(
    index_dir: Path, image_dir: Path, labels: Callable[[Path], dict]
) -> tuple[int, int, int]:
    """Relabel the indexed images under ``image_dir`` in place.

    ``index_folder`` only asks ``labels`` about new and changed files; this brings the
    unchanged ones in line too. Images of other folders keep their labels.

    Returns:
        ``(labels changed, labelled images, classes)``, the last two over the whole index.
    """
    from lookalike.index import IndexStore
    from lookalike.labels import LABEL_KEY, apply_labels, label_of

    root = Path(image_dir).expanduser().resolve()
    with IndexStore.open(index_dir, writable=True) as store:
        # apply_labels takes its source as the complete labelling: outside the folder,
        # answer with the label an image already has.
        kept = {
            str(Path(r.path)): label_of(r.metadata)
            for r in store.records("ok")
            if not Path(r.path).is_relative_to(root)
        }

        def scoped(path: Path) -> dict:
            if str(path) not in kept:
                return labels(path)
            label = kept[str(path)]
            return {LABEL_KEY: label} if label is not None else {}

        changed = apply_labels(store, scoped)
        now = [label_of(r.metadata) for r in store.records("ok")]
    named = [label for label in now if label is not None]
    return changed, len(named), len(set(named))


def path_forms(path: Path) -> list[str]:
    """The ways an indexed file may be stored: absolute as given, and fully resolved."""
    absolute = os.path.abspath(path.expanduser())
    return list(dict.fromkeys([absolute, str(Path(absolute).resolve())]))


def cmd_remove(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.index import IndexStore

    if bool(args.ids) == bool(args.paths):
        raise ConfigError("give either --id IDS or image PATHS to remove (not both)")
    with IndexStore.open(args.index, writable=True) as store:
        if args.ids:
            asked, removed = len(set(args.ids)), store.remove(args.ids)
        else:
            asked = len(set(args.paths))
            removed = store.remove_paths([form for p in args.paths for form in path_forms(p)])
        from lookalike.local.sync import sync_local
        from lookalike.rerank.dba import sync_dba

        sync_dba(store)  # keep a stored DBA correct
        sync_local(store, compute=False)  # and forget the removed images' local features
    print(f"removed {removed} image{'s' if removed != 1 else ''} from {args.index}")
    if removed < asked:
        print(f"({asked - removed} of the {asked} given were not in the index)")
    return 0


def index_info(store: IndexStore) -> dict:
    """What `info` shows, JSON-ready."""
    manifest = store.manifest
    failed = [{"id": r.id, "path": r.path, "error": r.error} for r in store.records("error")]
    return {
        "index": str(store.path.resolve()),
        "descriptor": manifest["descriptor"],
        "dim": manifest["dim"],
        "index_conf": manifest["index"],
        "whitening": manifest["whitening"],
        "counts": store.count(),
        "created": manifest.get("created"),
        "updated": manifest.get("updated"),
        "versions": manifest.get("versions", {}),
        "local": local_info(store),
        "failed": failed,
    }


def local_info(store: IndexStore) -> dict | None:
    """The index's local features (``index --local``, or cached by searches), or None."""
    from lookalike.local.store import LocalFeatureStore, stored_extractor
    from lookalike.local.sync import recorded_conf

    settings = stored_extractor(store.path)
    if settings is None:
        return None
    with LocalFeatureStore(store.path, settings["name"], create=False) as local:
        stats = local.stats()
    conf = recorded_conf(store)
    return {
        "extractor": settings,
        "images": stats["images"],
        "bytes": stats["file_bytes"],
        "recorded": conf is not None,  # kept current by `index` runs (index --local)
    }


def cmd_info(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.index import IndexStore

    with IndexStore.open(args.index) as store:
        info = index_info(store)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    d, counts, white = info["descriptor"], info["counts"], info["whitening"]
    if white.get("learned"):
        whitening = f"learned ({white.get('dim_out')}-d)"
    else:
        whitening = "off" if d.get("whitening") is None else "not learned yet"
    rows = [
        ("index", info["index"]),
        ("model", f"{d.get('model')} (weights: {d.get('weights') or 'packaged'})"),
        ("pooling", d.get("pooling")),
        ("image size", f"{d.get('image_size')} px"),
        ("scales", ", ".join(str(s) for s in d.get("scales", []))),
        ("whitening", whitening),
        ("dim", info["dim"]),
        ("factory", info["index_conf"].get("factory")),
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
    for key, value in rows:
        print(f"{key:<11} {value}")
    if info["failed"]:
        print(f"failed files ({len(info['failed'])}):")
        for row in info["failed"][:MAX_INFO_FAILED_SHOWN]:
            print(f"  [{row['id']}] {row['path']}: {row['error']}")
        if len(info["failed"]) > MAX_INFO_FAILED_SHOWN:
            print(f"  ... and {len(info['failed']) - MAX_INFO_FAILED_SHOWN} more (see --json)")
    return 0
