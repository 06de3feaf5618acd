"""``lookalike search`` and ``recognize``: query an index with image files or indexed ids.

``search`` lists the most alike indexed images (:meth:`lookalike.search.Searcher.answer`),
and a query that fails (an unreadable image, an unknown id) gets its one-line error in its
place, the others their results (exit status: the first failure's, 3 for an image);
``recognize`` soft-votes over them for a label (:mod:`lookalike.recognize`), abstaining when
the confidence is below a threshold. Both print a table, or JSON Lines with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.cli.options import (
    parse_box,
    parse_crops,
    parse_rerank,
    parse_rotations,
    verify_overrides,
)
from lookalike.cli.ui import Ui, print_error, print_warning, stdout_console
from lookalike.errors import ConfigError

if TYPE_CHECKING:
    from lookalike.recognize import Prediction
    from lookalike.search import Answer

# Recognition defaults, spelled out here so that `lookalike --help` imports no torch; the
# tests check them against lookalike.recognize.
CONFIDENCE_CHOICES = ("vote", "share", "margin", "top1", "distractor", "inliers")  # CONFIDENCE
#   keys; "inliers" needs --rerank ...,verify
DEFAULT_CONFIDENCE = "vote"  # recognize.DEFAULT_CONFIDENCE
DEFAULT_K = 10  # recognize.DEFAULT_K
DEFAULT_P = 8.0  # recognize.DEFAULT_P
DEFAULT_MIN_CONFIDENCE = 0.0  # Recognizer(min_confidence=...)
NEIGHBOURS_SHOWN = 3  # neighbours listed per image in the `recognize` table


def queries_of(args: argparse.Namespace) -> list:
    """The query images (with ``--box``) and then the ``--id`` ids, as queries."""
    from lookalike.query import Query

    if args.box and not args.images:
        raise ConfigError(
            "--box crops the query IMAGE files, and --id queries take no box: give IMAGE "
            "files to crop, or drop --box"
        )
    if getattr(args, "crops", None) and not args.images:
        raise ConfigError(
            "--crops searches regions of the query IMAGE files; --id queries are searched by "
            "their stored descriptor: give IMAGE files, or drop --crops"
        )
    box = parse_box(args.box) if args.box else None
    return [Query(image=p, box=box, name=str(p)) for p in args.images] + [
        Query(id=i) for i in getattr(args, "ids", [])
    ]


def cmd_search(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.search import Searcher

    if not args.images and not args.ids:
        raise ConfigError("nothing to search: give query IMAGE files and/or --id IDS")
    rotations = parse_rotations(args.rotations) if args.rotations else None
    rerank = parse_rerank(args.rerank)
    verify = verify_overrides(args, rerank)
    many = len(args.images) + len(args.ids) > 1
    queries = queries_of(args)  # bad options are refused before the index is opened
    with (
        Searcher.open(
            args.index, rerank, verify, device=args.device, crops=parse_crops(args.crops)
        ) as searcher,
        ui.bars() as bars,
    ):
        answers = searcher.answer(
            queries,
            args.k,
            rotations,
            progress=bars.callback("searching", "query") if many else None,
            errors="report",
        )
        verified = searcher.verified
    failed = [a.error for a in answers if a.error is not None]
    if args.json:
        for answer in answers:
            print(json.dumps(answer.to_dict(), ensure_ascii=False), flush=True)
            if answer.error is not None:
                print_error(query_error(answer))
    else:
        print_answers(answers, verified=verified)
    # the first failed query's kind: 3 for an unreadable image, 2 for an unknown id
    return failed[0].exit_code if failed else 0


def query_error(answer: Answer) -> str:
    """The one-line error of a failed query, naming it unless the message does."""
    message = str(answer.error)
    return message if answer.query in message else f"{answer.query}: {message}"


def print_answers(answers: list[Answer], verified: bool) -> None:
    """The human form of ``search``: a table per query; failed queries' errors on stderr,
    in order."""
    from rich.table import Table

    console = stdout_console()
    for answer in answers:
        if answer.error is not None:
            sys.stdout.flush()
            print_error(query_error(answer))
            continue
        table = Table(title=f"{answer.query}: {len(answer.hits)} results", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        if verified:
            table.add_column("inliers", justify="right")
        table.add_column("id", justify="right")
        table.add_column("path", overflow="fold")
        for hit in answer.hits:
            cells = [str(hit.rank), f"{hit.score:.4f}"]
            if verified:
                cells.append(str(hit.inliers) if hit.inliers is not None else "-")
            table.add_row(*cells, str(hit.id), hit.path)
        console.print(table)


def cmd_recognize(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.recognize import Recognizer, has_labels
    from lookalike.search import Searcher

    rerank = parse_rerank(args.rerank)
    verify = verify_overrides(args, rerank)
    queries = queries_of(args)
    crops = parse_crops(args.crops)
    with Searcher.open(args.index, rerank, verify, device=args.device, crops=crops) as searcher:
        recognizer = Recognizer(
            searcher,
            k=args.k,
            p=args.p,
            confidence=args.confidence,
            min_confidence=args.min_confidence,
        )
        if not has_labels(searcher.store):
            print_warning(
                f"index {args.index} has no labelled image, so every image is left "
                "unrecognised; label it with `lookalike index DIR --index ... --label-from "
                "folder|LABELS.csv`"
            )
        with ui.bars() as bars:
            update = bars.callback("recognizing", "query") if len(queries) > 1 else None
            predictions = recognizer.predict(queries, progress=update)
    answers = [(q.label, p) for q, p in zip(queries, predictions, strict=True)]
    if args.json:
        for image, prediction in answers:
            print(json.dumps(prediction.to_dict(image), ensure_ascii=False))
        return 0
    print_predictions(answers, args.confidence)
    return 0


def short_path(path: str) -> str:
    """``folder/file``: enough to tell neighbours apart in a table cell."""
    return "/".join(Path(path).parts[-2:])


def print_predictions(answers: list[tuple[str, Prediction]], method: str) -> None:
    """The human form of ``recognize``: one table row per image."""
    from rich.table import Table

    from lookalike.labels import label_of

    table = Table(title=f"recognition (confidence: {method})", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("label", overflow="fold")
    table.add_column("confidence", justify="right")
    table.add_column(f"top {NEIGHBOURS_SHOWN} neighbours: label score file", overflow="fold")
    for image, p in answers:
        neighbours = "\n".join(
            f"{label_of(h.metadata) or '-'} {h.score:.4f} {short_path(h.path)}"
            for h in p.neighbours[:NEIGHBOURS_SHOWN]
        )
        table.add_row(image, p.label or "-", f"{p.confidence:.4f}", neighbours)
    stdout_console().print(table)
