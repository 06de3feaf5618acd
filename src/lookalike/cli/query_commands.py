"""``lookalike search`` and ``recognize``: query an index with image files.

``search`` lists the most alike indexed images; ``recognize`` soft-votes over them for a
label (:mod:`lookalike.recognize`), abstaining when the confidence is below a threshold.
Both print a table, or JSON Lines with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.cli.options import parse_box, parse_rerank, parse_rotations, verify_overrides
from lookalike.cli.ui import Ui, print_warning, stdout_console
from lookalike.errors import ConfigError

if TYPE_CHECKING:
    from lookalike.index import IndexStore
    from lookalike.recognize import Prediction
    from lookalike.search import Hit

# Recognition defaults, spelled out here so that `lookalike --help` imports no torch; the
# tests check them against lookalike.recognize.
CONFIDENCE_CHOICES = ("vote", "share", "margin", "top1", "distractor", "inliers")  # CONFIDENCE
#   keys; "inliers" needs --rerank ...,verify
DEFAULT_CONFIDENCE = "vote"  # recognize.DEFAULT_CONFIDENCE
DEFAULT_K = 10  # recognize.DEFAULT_K
DEFAULT_P = 8.0  # recognize.DEFAULT_P
DEFAULT_MIN_CONFIDENCE = 0.0  # Recognizer(min_confidence=...)
NEIGHBOURS_SHOWN = 3  # neighbours listed per image in the `recognize` table


def hit_json(hit: Hit, inliers: int | None = None) -> dict:
    """A hit as printed by ``--json``: scores rounded to 6 decimals (float32 precision),
    plus its verified inlier count when it was verified."""
    from lookalike.search import hit_to_dict

    out = {**hit_to_dict(hit), "score": round(hit.score, 6)}
    if inliers is not None and inliers >= 0:
        out["inliers"] = int(inliers)
    return out


def cmd_search(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.search import Searcher

    if not args.images and not args.ids:
        raise ConfigError("nothing to search: give query IMAGE files and/or --id IDS")
    box = parse_box(args.box) if args.box else None
    rotations = parse_rotations(args.rotations) if args.rotations else None
    rerank = parse_rerank(args.rerank)
    verified = "verify" in rerank
    answers: list[tuple[str, list[Hit], list[int]]] = []
    verify = verify_overrides(args, rerank)
    with Searcher(args.index, device=args.device, verify=verify) as searcher:
        records = searcher.store.get(args.ids)
        for image_id, record in zip(args.ids, records, strict=True):
            if record is None:
                raise ConfigError(f"no image with id {image_id} in index {args.index}")
            if record.status != "ok":
                raise ConfigError(
                    f"image id {image_id} ({record.path}) failed to index, so it has no "
                    f"descriptor to search with: {record.error}"
                )
        with ui.bars() as bars:
            update = bars.callback("searching", "query") if len(args.images) > 1 else None
            for done, path in enumerate(args.images, 1):
                scores, ids, inliers = searcher.search_files_verified(
                    [path], args.k, [box], rotations, rerank
                )
                hits = searcher.results(scores, ids)[0]
                answers.append((str(path), hits, _inliers_of(hits, ids[0], inliers[0])))
                if update:
                    update(done, len(args.images))
        if args.ids:
            scores, ids, inliers = searcher.search_ids_verified(args.ids, args.k, rerank)
            for row, (record, hits) in enumerate(
                zip(records, searcher.results(scores, ids), strict=True)
            ):
                answers.append((record.path, hits, _inliers_of(hits, ids[row], inliers[row])))
    if args.json:
        for query, hits, inl in answers:
            results = [hit_json(h, n) for h, n in zip(hits, inl, strict=True)]
            print(json.dumps({"query": query, "results": results}, ensure_ascii=False))
        return 0
    from rich.table import Table

    console = stdout_console()
    for query, hits, inl in answers:
        table = Table(title=f"{query}: {len(hits)} results", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        if verified:
            table.add_column("inliers", justify="right")
        table.add_column("id", justify="right")
        table.add_column("path", overflow="fold")
        for hit, n in zip(hits, inl, strict=True):
            cells = [str(hit.rank), f"{hit.score:.4f}"]
            if verified:
                cells.append(str(n) if n >= 0 else "-")
            table.add_row(*cells, str(hit.id), hit.path)
        console.print(table)
    return 0


def _inliers_of(hits: list[Hit], ids, inliers) -> list[int]:
    """The inlier count of each hit (-1: not verified), matched by id."""
    by_id = {int(i): int(n) for i, n in zip(ids, inliers, strict=True) if i >= 0}
    return [by_id.get(h.id, -1) for h in hits]


def has_labels(store: IndexStore) -> bool:
    """Whether some image of the index carries a label (stops at the first one)."""
    from lookalike.labels import label_of

    return any(label_of(r.metadata) is not None for r in store.records("ok"))


def prediction_json(image: str, prediction: Prediction) -> dict:
    """One ``--json`` line of ``recognize``."""
    return {
        "image": image,
        "label": prediction.label,
        "confidence": prediction.confidence,
        "votes": [[label, vote] for label, vote in prediction.votes],
        "neighbours": [hit_json(h) for h in prediction.neighbours],
    }


def cmd_recognize(args: argparse.Namespace, ui: Ui) -> int:
    from lookalike.recognize import Recognizer
    from lookalike.search import Searcher

    box = parse_box(args.box) if args.box else None
    answers: list[tuple[str, Prediction]] = []
    rerank = parse_rerank(args.rerank)
    verify = verify_overrides(args, rerank)
    with Searcher(args.index, device=args.device, verify=verify) as searcher:
        recognizer = Recognizer(
            searcher,
            k=args.k,
            p=args.p,
            confidence=args.confidence,
            min_confidence=args.min_confidence,
            rerank=rerank,
        )
        if not has_labels(searcher.store):
            print_warning(
                f"index {args.index} has no labelled image, so every image is left "
                "unrecognised; label it with `lookalike index DIR --index ... --label-from "
                "folder|LABELS.csv`"
            )
        with ui.bars() as bars:
            update = bars.callback("recognizing", "query") if len(args.images) > 1 else None
            for done, path in enumerate(args.images, 1):
                (prediction,) = recognizer.predict_files([path], [box])
                answers.append((str(path), prediction))
                if update:
                    update(done, len(args.images))
    if args.json:
        for image, prediction in answers:
            print(json.dumps(prediction_json(image, prediction), ensure_ascii=False))
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
