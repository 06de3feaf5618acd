"""The ``lookalike`` command: index, search, recognize, match, remove, info, eval, presets,
check, repair, train.

Thin by design: each command parses its options, calls one function of a stage
(``indexing``, ``search``, ``recognize``, ``local``, ``evaluate``, ``presets``) and formats the
result; ``--json`` prints what that function returned. The parser and :func:`main`
live here; the commands live by topic in :mod:`~lookalike.cli.index_commands`,
:mod:`~lookalike.cli.query_commands`, :mod:`~lookalike.cli.eval_commands`,
:mod:`~lookalike.cli.check_commands` and :mod:`~lookalike.cli.train_commands`, the shared
options in :mod:`~lookalike.cli.options`, and logging handlers and progress bars in
:mod:`~lookalike.cli.ui` and nowhere else. torch and onnxruntime are imported inside the
commands, so ``lookalike --help`` is quick and spawned decoder processes, which re-import
this package, stay light.

Every fault prints ``error: ...`` on one line, never a traceback: errors a user can cause
(:class:`~lookalike.errors.LookalikeError`) exit with the error's ``exit_code``; stray
``OSError`` and ``sqlite3`` errors are mapped by :mod:`~lookalike.cli.faults` (disk full,
read-only, permission: 6; a missing index file or a damaged database: 4); Ctrl-C exits 130;
usage errors exit 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from lookalike.cli.check_commands import add_check_parsers
from lookalike.cli.eval_commands import DATASET_KINDS, cmd_eval, cmd_presets
from lookalike.cli.faults import fault
from lookalike.cli.index_commands import add_engine_options, cmd_index, cmd_info, cmd_remove
from lookalike.cli.local_commands import cmd_match
from lookalike.cli.options import (
    CROPS_HELP,
    DEVICES,
    LOCAL_CHOICES,
    add_descriptor_options,
    add_local_options,
    add_milvus_options,
    int_at_least,
    parse_box,
    parse_rotations,
)
from lookalike.cli.query_commands import (
    CONFIDENCE_CHOICES,
    DEFAULT_CONFIDENCE,
    DEFAULT_K,
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_P,
    cmd_recognize,
    cmd_search,
)
from lookalike.cli.serve_commands import add_serve_parser
from lookalike.cli.train_commands import add_train_parser
from lookalike.cli.ui import Ui, configure_logging, print_error, silence_stdout, stderr_console

__all__ = ["build_parser", "main", "parse_box", "parse_rotations"]

BOX_HELP = (
    "crop x1,y1,x2,y2 (pixels) applied to every IMAGE (not to --id queries); negative "
    "values work as --box -10,-10,50,50 or --box=-10,-10,50,50"
)
RERANK_HELP = (
    "re-ranking stages, comma-separated: aqe, alpha-qe, dba (descriptor space, in order), "
    "asmk (local-feature first stage) and verify (local features + RANSAC, always last), "
    "e.g. dba,alpha-qe,verify; 'none' for the first stage alone; default 'auto': on an "
    "index of at most 10,000 images, regional crops 0.5 + verify (about 1 s per query on a "
    "2-core CPU), else none"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lookalike`` command."""
    from lookalike import __version__

    # Global flags work before and after the command: the sub-parsers' copies only set a
    # value when given (SUPPRESS), so they never overwrite the main parser's.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)

    parser = argparse.ArgumentParser(
        prog="lookalike", description="Image instance retrieval: index a folder, find lookalikes."
    )
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log INFO (-v) or DEBUG (-vv)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", parents=[common], help="create or update an index from a folder")
    p.add_argument("dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument(
        "--remove-missing", action="store_true", help="drop indexed files no longer on disk"
    )
    p.add_argument(
        "--label-from",
        metavar="folder|parent|LABELS.csv",
        help="label the images for `recognize`: by their first sub-folder of DIR ('folder'; "
        "images directly in DIR stay unlabelled), by their parent folder's name ('parent', "
        "as `lookalike train` labels), or from a CSV with header 'path,label' "
        "(paths relative to DIR); already indexed images are relabelled in place",
    )
    add_descriptor_options(p)
    add_local_options(p, at_index=True)
    add_engine_options(p)
    add_milvus_options(p, uri=True)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", parents=[common], help="find the indexed images most alike")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="query image files")
    p.add_argument("-k", type=int_at_least(0), default=10, help="results per query, 0: all")
    p.add_argument("--box", help=BOX_HELP)
    p.add_argument("--id", type=int, nargs="+", default=[], dest="ids", help="indexed ids")
    p.add_argument("--rotations", help="query angles searched, e.g. 0,90,270 (default: preset)")
    p.add_argument("--crops", help=CROPS_HELP)
    p.add_argument("--rerank", default="auto", help=RERANK_HELP)
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per query")
    p.add_argument("--device", choices=DEVICES, default="auto")
    add_local_options(p, at_index=False)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "recognize", parents=[common], help="label images by a vote of their labelled lookalikes"
    )
    p.add_argument("--index", type=Path, required=True, help="labelled index directory")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="query image files")
    p.add_argument(
        "-k", type=int_at_least(1), default=DEFAULT_K, help="neighbours that vote (%(default)s)"
    )
    p.add_argument(
        "--p",
        type=float,
        default=DEFAULT_P,
        help="vote exponent: a neighbour votes similarity ** p for its label (%(default)s)",
    )
    p.add_argument(
        "--confidence",
        choices=CONFIDENCE_CHOICES,
        default=DEFAULT_CONFIDENCE,
        help="how sure a label is (%(default)s; see lookalike.recognize.CONFIDENCE)",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=DEFAULT_MIN_CONFIDENCE,
        metavar="X",
        help="abstain (label '-', null in JSON) below this confidence (%(default)s)",
    )
    p.add_argument("--box", help=BOX_HELP)
    p.add_argument("--crops", help=CROPS_HELP)
    p.add_argument(
        "--rerank",
        default="none",
        help=RERANK_HELP.replace("default 'auto'", "'auto'")
        + "; default none (the confidences are measured on the first stage's similarities); "
        "verify gives the inliers confidence",
    )
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per image")
    p.add_argument("--device", choices=DEVICES, default="auto")
    add_local_options(p, at_index=False)
    p.set_defaults(func=cmd_recognize)

    p = sub.add_parser(
        "match", parents=[common], help="verify two images and draw their inlier matches"
    )
    p.add_argument("images", nargs=2, type=Path, metavar="IMAGE", help="the two image files")
    p.add_argument("--out", type=Path, metavar="PNG", help="write the match overlay here")
    p.add_argument(
        "--local",
        choices=LOCAL_CHOICES,
        metavar="NAME",
        help="local features: "
        + ", ".join(LOCAL_CHOICES)
        + " (default: aliked when its weights are on disk, else rootsift; nothing downloaded)",
    )
    p.add_argument(
        "--local-weights",
        metavar="PATH",
        help="ALIKED checkpoint (aliked-n16.pth); implies aliked",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("remove", parents=[common], help="remove images by id or path")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="indexed image paths")
    p.add_argument("--id", type=int, nargs="+", default=[], dest="ids", help="image ids")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("info", parents=[common], help="describe an index")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    add_milvus_options(p, uri=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", parents=[common], help="measure retrieval on a benchmark")
    p.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="benchmark layout")
    p.add_argument("--root", type=Path, required=True, help="dataset folder")
    p.add_argument("--index", type=Path, help="index directory to build or reuse (default: temp)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write the results here")
    p.add_argument(
        "--labels",
        type=Path,
        metavar="CSV",
        help="--dataset labelled: path,label CSV (default: an image's parent folder name)",
    )
    add_descriptor_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", parents=[common], help="list every stage's named presets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_presets)

    add_check_parsers(sub, common)
    add_train_parser(sub, common)
    add_serve_parser(sub, common)
    return parser


# An option value may start with '-' (a box left of or above the image): argparse would
# read it as an option, so it is glued to its option first.
VALUED_OPTIONS = ("--box",)
NEGATIVE_VALUE = re.compile(r"^-[\d.]")


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--box", "-100,-100,-50,-50"]`` -> ``["--box=-100,-100,-50,-50"]``."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            out.append(arg)
            out.extend(args)
            break
        if arg in VALUED_OPTIONS:
            value = next(args, None)
            if value is not None and NEGATIVE_VALUE.match(value):
                out.append(f"{arg}={value}")
                continue
            out.append(arg)
            if value is not None:
                out.append(value)
            continue
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see :mod:`lookalike.cli.faults`)."""
    argv = attach_negative_values(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors (2)
        return stop.code if isinstance(stop.code, int) else 1
    console = stderr_console()
    restore = configure_logging(args.verbose, console)
    try:
        return args.func(args, Ui(console, enabled=not args.quiet))
    except KeyboardInterrupt:
        print_error("interrupted (what an index had committed is kept; rerun to resume)")
        return 130
    except BrokenPipeError:  # `lookalike search ... | head`
        silence_stdout()
        return 1
    except Exception as error:  # one line for every fault, see lookalike.cli.faults
        message, code = fault(error, getattr(args, "index", None))
        print_error(message)
        return code
    finally:
        restore()
