"""``lookalike train``: fine-tune the descriptor on a labelled folder; with ``--index``, also
describe that index again with the new model, compare both and say which to use.

One call of :func:`lookalike.train.train_and_index`; prints the per-epoch validation, and
the before / after table (``--json``: what the call returned). Exit status 0, or 1 when the
new model is a regression (not promoted); Ctrl-C saves the run (exit 130, ``--resume``
continues it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lookalike.cli.options import int_at_least
from lookalike.cli.ui import Ui

REGRESSION_EXIT = 1


def add_train_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``train`` on the command's sub-parsers."""
    p = sub.add_parser(
        "train",
        parents=[common],
        help="fine-tune the descriptor on labelled images (and re-index with it)",
    )
    p.add_argument("data", type=Path, help="labelled folder: an image's label is its parent folder")
    p.add_argument("--out", type=Path, required=True, help="the model directory to write")
    p.add_argument(
        "--index",
        type=Path,
        help="an index (labelled like DATA, e.g. --label-from parent) to describe again with the "
        "new model into a new index beside it; both are compared on the validation images",
    )
    p.add_argument("--new-index", type=Path, help="where the new index goes (default INDEX-OUT)")
    p.add_argument("--labels", type=Path, metavar="CSV", help="path,label CSV instead of folders")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--val", type=Path, help="validation folder (same layout as DATA)")
    v.add_argument(
        "--val-fraction", type=float, help="held out per class when no --val (default 0.1)"
    )
    p.add_argument("--preset", default="default", help="training preset (`lookalike presets`)")
    p.add_argument("--loss", help="loss preset: arcface, subcenter-dynamic, curricularface, ...")
    p.add_argument(
        "--sizes", type=parse_sizes, help="progressive sizes, size:epochs, e.g. 224:4,320:2"
    )
    p.add_argument("--freeze-epochs", type=int_at_least(0), help="first epochs, backbone frozen")
    p.add_argument(
        "--frozen-stages", type=int_at_least(0), help="backbone stages frozen throughout (4)"
    )
    p.add_argument("--batch-size", type=int_at_least(2))
    p.add_argument("--lr", type=float, help="the backbone's peak learning rate")
    p.add_argument("--head-lr", type=float, help="the head's (pooling, projection, classes)")
    p.add_argument(
        "--dim", type=int_at_least(0), help="projection size (default 512; 0: no projection)"
    )
    p.add_argument(
        "--pooling", choices=("gem", "rgem", "rmac"), help="learned GeM (default), R-GeM, R-MAC"
    )
    p.add_argument("--model", help="backbone: a registered name or any timm name")
    p.add_argument("--weights", help="local checkpoint of the backbone")
    p.add_argument(
        "--wise",
        type=float,
        help="weight-space ensemble: share of the fine-tuned backbone kept, the rest its "
        "starting weights (default 0.7; 1: fine-tuned only)",
    )
    p.add_argument("--index-size", type=int_at_least(32), help="long side images are indexed at")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int_at_least(0), help="decoding processes")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_train)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``--sizes``; imported when given (``lookalike.train`` loads torch)."""
    from lookalike.errors import ConfigError
    from lookalike.train.conf import parse_sizes as parse

    try:
        return parse(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


OPTIONS = (
    "loss", "sizes", "freeze_epochs", "frozen_stages", "batch_size", "lr", "head_lr", "dim",
    "pooling", "model", "weights", "wise", "index_size", "seed", "device", "workers",
    "val_fraction",
)  # fmt: skip


def train_conf(args: argparse.Namespace):  # -> TrainConf
    """The preset with the options given."""
    from lookalike.train.conf import train_preset

    changes = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    if changes.get("dim") == 0:
        changes["dim"] = None  # the backbone's channels, no projection
    return train_preset(args.preset).replace(**changes)


def cmd_train(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.train.pipeline import train_and_index

    conf = train_conf(args)
    with ui.bars() as bars:
        outcome = train_and_index(
            args.data,
            conf,
            args.out,
            args.index,
            new_index=args.new_index,
            val=args.val,
            labels=args.labels,
            resume=args.resume,
            progress=bars.training(),
            index_progress=bars.callback("re-indexing", "img"),
            eval_progress=bars.callback("evaluating", "query"),
        )
    code = REGRESSION_EXIT if outcome.promoted is False else 0
    if args.json:
        print(json.dumps(outcome.to_dict(), ensure_ascii=False))
        return code
    _print_training(outcome.model_dir)
    if outcome.before is not None and outcome.after is not None:
        print(f"validation queries: {outcome.before.queries} against the indexed images")
        print(f"  {'':<14}{'before':>10}{'after':>10}")
        rows = [
            ("P@1", outcome.before.p_at_1, outcome.after.p_at_1),
            ("mAP", outcome.before.map, outcome.after.map),
            ("mAP@R", outcome.before.map_at_r, outcome.after.map_at_r),
            ("recognition", outcome.before.accuracy, outcome.after.accuracy),
        ]
        for name, before, after in rows:
            print(f"  {name:<14}{100 * before:>10.1f}{100 * after:>10.1f}")
        print(f"  old index {outcome.index}")
        print(f"  new index {outcome.new_index}")
        print(outcome.verdict)
    return code


def _print_training(model_dir: Path) -> None:
    from lookalike.train.model_dir import read_info

    info = read_info(model_dir)
    print(f"model {model_dir.resolve()} (best epoch {info.get('best_epoch')})")
    for e in info.get("epochs", []):
        val = e.get("val") or {}
        scores = (
            f"val R@1 {100 * val['recall_at_1']:.1f}  mAP@R {100 * val['map_at_r']:.1f}"
            if val
            else "no validation"
        )
        frozen = " frozen" if e.get("frozen") else ""
        print(
            f"  epoch {e['epoch']:>2}  {e['size']} px{frozen:<7}  loss {e['loss']:.3f}  "
            f"{e['images_per_s']:.1f} img/s  {scores}"
        )
    best = next((e for e in info.get("epochs", []) if e["epoch"] == info.get("best_epoch")), None)
    worst = ((best or {}).get("val") or {}).get("worst", [])
    for c in (c for c in worst if c["recall_at_1"] < 1):  # the classes it still misses
        confused = "" if c["confused_with"] is None else f", confused with {c['confused_with']}"
        print(f"  worst: {c['label']} (R@1 {100 * c['recall_at_1']:.0f}{confused})")
