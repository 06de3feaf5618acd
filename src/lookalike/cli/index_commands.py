"""``lookalike index``, ``remove`` and ``info``: build, prune and describe an index.

Each parses, calls one function of :mod:`lookalike.indexing` and prints its result (a
summary, or ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from lookalike.cli.options import index_verify_conf, int_at_least, settings_of, use_milvus_token
from lookalike.cli.ui import Ui, print_warning
from lookalike.errors import ConfigError

MAX_FAILED_SHOWN = 10  # failed files listed by `index` before "... and N more"
MAX_INFO_FAILED_SHOWN = 50  # the same for `info` (all of them with --json)
# Spelled out so that `lookalike --help` imports no torch; a test compares them with
# lookalike.indexing.ray_engine.ENGINES.
ENGINE_CHOICES = ("local", "ray")
RAY_OPTIONS = {"ray_address": "address", "actors": "actors", "batch_size": "batch_size"}


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``index --engine ray [--ray-address auto|URI] [--actors N] [--batch-size B]``."""
    g = p.add_argument_group("engine (what decodes and describes the images)")
    g.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="local",
        help="local: this process and its --workers (default); ray: Ray Data actors, "
        "committed here as they finish (pip install 'lookalike[ray]'); the index is the same",
    )
    g.add_argument(
        "--ray-address",
        metavar="auto|URI",
        help="the Ray cluster: auto (the running one) or ray://HOST:PORT; default: start a "
        "local Ray on this machine's CPUs",
    )
    g.add_argument(
        "--actors",
        type=int_at_least(1),
        metavar="N",
        help="describing actors (default: one per CPU of the cluster, one per GPU on CUDA)",
    )
    g.add_argument(
        "--batch-size", type=int_at_least(1), metavar="B", help="files per Ray batch (32)"
    )


def engine_of(args: argparse.Namespace):  # -> RayConf | None
    """The Ray settings that ``--engine ray`` and its options ask for; None without it.

    Raises:
        ConfigError: a Ray option without ``--engine ray``.
    """
    given = {name: getattr(args, name) for name in RAY_OPTIONS if getattr(args, name) is not None}
    if args.engine != "ray":
        if given:
            named = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ConfigError(f"{named} apply to the Ray engine: add --engine ray")
        return None
    from lookalike.indexing.ray_engine import RayConf

    return RayConf(**{RAY_OPTIONS[name]: value for name, value in given.items()})


@contextlib.contextmanager
def quiet_ray(verbose: int) -> Iterator[None]:
    """Ray Data logs each execution at INFO on its own handler; shown with ``-v`` only."""
    ray_data = logging.getLogger("ray.data")
    level = ray_data.level
    if not verbose:
        ray_data.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray_data.setLevel(level)


def cmd_index(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.indexing import index_folder
    from lookalike.labels import label_source

    # A bad label file is refused before any image is described.
    labels = label_source(args.label_from, args.dir) if args.label_from is not None else None
    use_milvus_token(args)
    settings = settings_of(args, args.index)
    local = index_verify_conf(args)
    ray = engine_of(args)
    with ui.bars() as bars, quiet_ray(args.verbose):
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
            engine=args.engine,
            ray=ray,
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


def engine_rows(backend: dict) -> list[tuple[str, str]]:
    """The ``engine`` row of a backend whose vectors live outside the process (Milvus)."""
    engine = backend.get("engine")
    if engine is None:
        return []
    indexed = engine.get("indexed_rows")
    state = f"{engine['load_state']}; Milvus reports {indexed} of {backend['live']} rows indexed"
    return [("engine", f"{engine['engine']} {engine['where']}, collection {engine['collection']}"),
            ("state", state)]  # fmt: skip


def cmd_info(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.indexing import index_info

    use_milvus_token(args)
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
        *engine_rows(backend),
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
