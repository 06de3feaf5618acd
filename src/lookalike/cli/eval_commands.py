"""``lookalike eval`` and ``presets``: measure retrieval on a benchmark, list the presets.

``eval`` builds (or reuses) an index of a dataset with the same descriptor options as
``index`` and prints the metrics of :func:`lookalike.evaluate.evaluate_dataset` (for
``--dataset labelled``: :func:`~lookalike.evaluate.run.evaluate_labelled`, with the worst
classes); ``presets``
shows the named settings those options choose from.
"""

from __future__ import annotations

import argparse
import json

from lookalike.cli.options import settings_options
from lookalike.cli.ui import Ui, stdout_console

DATASET_KINDS = ("oxford5k", "holidays", "paris6k", "folder", "labelled")  # evaluate()'s kinds
TIMINGS = ("images", "failed", "queries", "index_seconds", "images_per_second", "query_ms")


def cmd_eval(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.evaluate import evaluate

    with ui.bars() as bars:
        callbacks = {
            "index": bars.callback("indexing", "img"),
            "search": bars.callback("queries", "query"),
        }
        result = evaluate(
            args.dataset,
            args.root,
            args.index,
            args.preset,
            progress=lambda stage, done, total: callbacks[stage](done, total),
            chunk=args.chunk,
            labels=args.labels,
            **settings_options(args),
        )
    from rich.table import Table

    name = result["preset"]
    table = Table(title=f"{args.dataset} {result['dataset']}, preset {name}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, "n/a" if value is None else str(value))
    table.add_section()
    for key in TIMINGS:
        if key in result:
            table.add_row(key, str(result[key]))
    stdout_console().print(table)
    if result.get("worst"):
        worst = Table(title="worst classes (lowest R@1)", title_justify="left")
        for column in ("class", "images", "R@1", "confused with"):
            worst.add_column(column)
        for c in result["worst"]:
            worst.add_row(
                str(c['label']), str(c['images']), f"{100 * c['recall_at_1']:.1f}",
                "-" if c["confused_with"] is None else str(c["confused_with"]),
            )  # fmt: skip
        stdout_console().print(worst)
    if args.json is not None:
        args.json.expanduser().parent.mkdir(parents=True, exist_ok=True)
        args.json.expanduser().write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def show(value: object) -> str:
    """A setting in a table cell: ``1, 2`` for sequences, ``a=1 b=(c=2)`` for dicts."""
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(
            f"{k}=({show(v)})" if isinstance(v, dict) else f"{k}={show(v)}"
            for k, v in value.items()
        )
    return str(value)


def cmd_presets(args: argparse.Namespace, ui: Ui) -> int:
    from rich.table import Table

    from lookalike.presets import presets

    tables = presets()
    if args.json:
        print(json.dumps(tables, indent=2))
        return 0
    extract = Table(title="extract presets (--preset)", title_justify="left")
    columns = (
        "name",
        "model",
        "image size",
        "scales",
        "pooling",
        "whitening",
        "rotations",
        "crops",
    )
    for column in columns:
        extract.add_column(column)
    for name, c in tables["extract"].items():
        white = "off" if c["whitening"] is None else show(c["whitening"])
        pooling = f"gem p={c['gem_p']}" if c["pooling"] == "gem" else c["pooling"]
        crops = show(c["query_crops"]) if c["query_crops"] else "off"
        row = (c["model"], c["image_size"], c["scales"], pooling, white, c["query_rotations"])
        extract.add_row(name, *map(show, row), crops)
    index = Table(title="index presets (--index-preset)", title_justify="left")
    for column in ("name", "backend", "factory", "nprobe", "ef_search"):
        index.add_column(column)
    for name, ic in tables["index"].items():
        index.add_row(name, ic["backend"], ic["factory"], str(ic["nprobe"]), str(ic["ef_search"]))
    rerank = Table(title="re-ranking stages (--rerank a,b,...)", title_justify="left")
    for column in ("stage", "settings"):
        rerank.add_column(column)
    for name, entry in tables["rerank"].items():
        ((_, settings),) = entry.items()
        if isinstance(settings, dict):
            settings = {k: v for k, v in settings.items() if v is not None}
        rerank.add_row(name, show(settings))
    verify = Table(
        title="verify presets (index --local NAME picks the one for NAME)", title_justify="left"
    )
    columns = ("features", "max_keypoints", "max_side", "ratio", "model", "threshold_px")
    for column in ("name", *columns, "budget", "fusion"):
        verify.add_column(column)
    for name, vc in tables["verify"].items():
        verify.add_row(name, *(show(vc[c]) for c in (*columns, "budget", "fusion")))
    train = Table(title="training presets (train --preset)", title_justify="left")
    columns = ("loss", "sizes", "freeze_epochs", "batch_size", "lr", "head_lr", "dim", "pooling")
    for column in ("name", *columns):
        train.add_column(column)
    for name, tc in tables["train"].items():
        train.add_row(name, *(show(tc[c]) for c in columns))
    loss = Table(title="loss presets (train --loss)", title_justify="left")
    for column in ("name", "kind", "settings", "miner"):
        loss.add_column(column)
    for name, lc in tables["loss"].items():
        miner = "-" if lc["miner"] is None else f"{lc['miner']} {show(lc['miner_params'])}"
        loss.add_row(name, lc["kind"], show(lc["params"]), miner)
    console = stdout_console()
    for table in (extract, index, rerank, verify, train, loss):
        console.print(table)
    return 0
