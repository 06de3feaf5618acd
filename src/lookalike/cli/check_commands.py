"""``lookalike check`` and ``repair``: find what is damaged in an index, and mend it.

Each calls one function of :mod:`lookalike.index.check` / :mod:`lookalike.index.repair` and
prints its report: one line per problem (``--json``: what the function returned). ``check``
exits 0 when the index is sound and 4 when it is damaged; ``repair`` exits 0 when the index
is sound afterwards.
"""

from __future__ import annotations

import argparse
import json

from lookalike.cli.ui import Ui, print_warning
from lookalike.errors import IndexStateError

DAMAGED_EXIT = IndexStateError.exit_code


def add_check_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``check`` and ``repair`` on the command's sub-parsers."""
    from pathlib import Path

    p = sub.add_parser("check", parents=[common], help="check every file of an index")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "repair", parents=[common], help="mend a damaged index from what is still sound"
    )
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_repair)


def cmd_check(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.index.check import check_index

    report = check_index(args.index)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0 if report.sound else DAMAGED_EXIT
    state = "sound" if report.sound else f"damaged ({len(report.problems)} problems)"
    print(
        f"index {report.path}: {state}; {report.images} images, {report.blocks} vector blocks "
        f"checked in {report.seconds:.2f} s"
    )
    for problem in report.problems:
        print(f"  {problem.line()}")
    for note in report.notes:
        print(f"  note: {note}")
    if not report.sound:
        print(f"run `lookalike repair --index {report.path}` to mend what can be mended")
    return 0 if report.sound else DAMAGED_EXIT


def cmd_repair(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.index.repair import repair_index

    report = repair_index(args.index)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0 if report.sound else DAMAGED_EXIT
    if not report.found:
        print(f"index {report.path}: sound, nothing to repair")
        return 0
    print(f"index {report.path}: {len(report.found)} problems found")
    for line in report.found:
        print(f"  {line}")
    done = [
        (report.redescribe, f"{len(report.redescribe)} images to describe again"),
        (report.checkpoint_rebuilt, "checkpoint rebuilt"),
        (report.whitening_relearned, "whitening learned again"),
        (report.dba_removed, "DBA deleted (computed again on first use)"),
        (report.local_removed, "local features deleted (the next `lookalike index` computes them)"),
    ]
    for flag, text in done:
        if flag:
            print(f"  repaired: {text}")
    for path in report.redescribe[:10]:
        print(f"    {path}")
    if len(report.redescribe) > 10:
        print(f"    ... and {len(report.redescribe) - 10} more")
    for warning in report.warnings:
        print_warning(warning)
    for line in report.left:
        print(f"  still damaged: {line}")
    if report.redescribe:
        print("run `lookalike index` on the image folder to describe them again")
    return 0 if report.sound else DAMAGED_EXIT
