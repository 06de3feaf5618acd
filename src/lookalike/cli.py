"""The ``lookalike`` command: index, search, remove, info, eval, presets.

Thin by design: each command parses its options, calls one stage (``indexing``,
``search``, ``index``, ``evaluate``) and formats the result. Logging handlers and progress
bars are configured here and nowhere else. torch and onnxruntime are imported inside the
commands, so ``lookalike --help`` is quick and spawned decoder processes, which re-import
this module, stay light.

Errors a user can cause (:class:`~lookalike.errors.LookalikeError`) print ``error: ...`` on
one line and exit with the error's ``exit_code``; Ctrl-C exits 130; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.errors import ConfigError, IndexStateError, LookalikeError

if TYPE_CHECKING:
    from rich.console import Console

    from lookalike.extract import ExtractConf
    from lookalike.index import IndexConf, IndexStore
    from lookalike.search import Hit

logger = logging.getLogger(__name__)

MAX_FAILED_SHOWN = 10  # failed files listed by `index` before "... and N more"
MAX_INFO_FAILED_SHOWN = 50  # the same for `info` (all of them with --json)
_DESCRIPTOR_OPTIONS = ("model", "weights", "image_size", "pooling")
DATASET_KINDS = ("oxford5k", "holidays", "paris6k", "folder")  # keys of evaluate.DATASETS

# -- options -------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` (pixels) -> a box; ``ConfigError`` unless x1 < x2 and y1 < y2."""
    parts = [p.strip() for p in text.split(",")]
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--box {text!r} must be four numbers x1,y1,x2,y2 (pixels), e.g. --box 10,20,200,180"
        ) from None
    if not (x1 < x2 and y1 < y2):
        raise ConfigError(f"--box {text!r} is empty: give x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def parse_rotations(text: str) -> tuple[int, ...]:
    """``"0,90,270"`` -> angles in degrees; ``ConfigError`` unless multiples of 90."""
    try:
        angles = tuple(int(p) for p in text.split(","))
    except ValueError:
        angles = ()
    if not angles or any(a % 90 for a in angles):
        raise ConfigError(f"--rotations {text!r} must be multiples of 90 degrees, e.g. 0,90,270")
    return angles


def _add_descriptor_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("descriptor (default: the index's own settings, else 'default')")
    g.add_argument("--preset", help="extract preset (see `lookalike presets`)")
    g.add_argument("--model", help="backbone: a registered name or any timm name")
    g.add_argument("--weights", help="local checkpoint file for --model")
    g.add_argument("--image-size", type=_int_at_least(1), help="long side of the images, pixels")
    g.add_argument("--pooling", help="gap, spoc, mac, gem or rmac")
    x = p.add_mutually_exclusive_group()
    x.add_argument("--factory", help="faiss index_factory string for a new index, e.g. HNSW32")
    x.add_argument("--index-preset", help="index preset for a new index (see `lookalike presets`)")
    p.add_argument("--workers", type=_int_at_least(0), help="image decoding processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the model runs")
    p.add_argument("--chunk", type=_int_at_least(1), default=32, help=argparse.SUPPRESS)


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
    _add_descriptor_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", parents=[common], help="find the indexed images most alike")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="query image files")
    p.add_argument("-k", type=_int_at_least(0), default=10, help="results per query, 0: all")
    p.add_argument("--box", help="crop x1,y1,x2,y2 (pixels) applied to every IMAGE")
    p.add_argument("--id", type=int, nargs="+", default=[], dest="ids", help="indexed ids")
    p.add_argument("--rotations", help="query angles searched, e.g. 0,90,270 (default: preset)")
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per query")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("remove", parents=[common], help="remove images by id or path")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="indexed image paths")
    p.add_argument("--id", type=int, nargs="+", default=[], dest="ids", help="image ids")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("info", parents=[common], help="describe an index")
    p.add_argument("--index", type=Path, required=True, help="index directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", parents=[common], help="measure retrieval on a benchmark")
    p.add_argument("--dataset", required=True, choices=DATASET_KINDS, help="benchmark layout")
    p.add_argument("--root", type=Path, required=True, help="dataset folder")
    p.add_argument("--index", type=Path, help="index directory to build or reuse (default: temp)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write the results here")
    _add_descriptor_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", parents=[common], help="list extract and index presets")
    p.set_defaults(func=cmd_presets)
    return parser


# -- entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors (2)
        return stop.code if isinstance(stop.code, int) else 1
    console = _stderr_console()
    restore = _configure_logging(args.verbose, console)
    try:
        return args.func(args, _Ui(console, enabled=not args.quiet))
    except LookalikeError as error:
        _print_error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        _print_error("interrupted (what an index had committed is kept; rerun to resume)")
        return 130
    except BrokenPipeError:  # `lookalike search ... | head`
        _silence_stdout()
        return 1
    except OSError as error:  # unreadable dataset file, unwritable --json target, ...
        _print_error(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
        return 1
    finally:
        restore()


def _print_error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console() -> Console:
    from rich.console import Console

    # Piped output is not cut at 80 columns: paths stay whole for grep and friends.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


def _configure_logging(verbose: int, console: Console) -> Callable[[], None]:
    """Send logs to stderr (WARNING, -v INFO, -vv DEBUG); returns the undo function."""
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console, show_time=False, show_path=False, markup=False
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("lookalike")
    old_level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)

    def restore() -> None:
        root.removeHandler(handler)
        ours.setLevel(old_level)

    return restore


class _Ui:
    """Progress bars on stderr: rich bars with rate and ETA, off when quiet or not a TTY."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal

    def bars(self) -> _Bars:
        return _Bars(self.console, self.enabled)


class _Bars:
    """A rich Progress whose bars appear on the first call of their :meth:`callback`."""

    def __init__(self, console: Console, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                unit = task.fields.get("unit", "it")
                return Text(f"{task.speed:.1f} {unit}/s" if task.speed else f"- {unit}/s")

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            redirect_stdout=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tasks:
            self._progress.stop()

    def callback(self, description: str, unit: str) -> Callable[[int, int], None]:
        """``update(done, total)`` for the bar called ``description``."""

        def update(done: int, total: int) -> None:
            task = self._tasks.get(description)
            if task is None:  # started on first use: nothing is drawn for a stage never run
                if not self._tasks:
                    self._progress.start()
                task = self._progress.add_task(description, total=total, unit=unit)
                self._tasks[description] = task
            self._progress.update(task, completed=done, total=total)

        return update


# -- settings --------------------------------------------------------------------------------


def _manifest_of(index_dir: Path | None) -> dict | None:
    """The manifest of an existing index, None where there is none yet."""
    from lookalike.index.manifest import MANIFEST_NAME, read_manifest

    if index_dir is None or not (index_dir.expanduser() / MANIFEST_NAME).exists():
        return None
    return read_manifest(index_dir.expanduser())


def _extract_conf(args: argparse.Namespace, manifest: dict | None) -> tuple[str, ExtractConf]:
    """``(preset name, conf)``: the index's own settings unless descriptor options are given."""
    from lookalike.extract import get_preset
    from lookalike.search import conf_from_descriptor

    overrides: dict[str, object] = {
        k: getattr(args, k) for k in _DESCRIPTOR_OPTIONS if getattr(args, k) is not None
    }
    if "weights" in overrides:
        overrides["weights"] = str(Path(str(overrides["weights"])).expanduser().resolve())
    if args.preset is None and not overrides and manifest is not None:
        try:
            name, conf = "(from index)", conf_from_descriptor(manifest["descriptor"])
        except TypeError as error:
            raise IndexStateError(
                f"the index's descriptor settings are not understood ({error}); upgrade "
                "lookalike or give --preset"
            ) from None
    else:
        name = args.preset or "default"
        conf = get_preset(name).replace(**overrides) if overrides else get_preset(name)
    runtime = {"device": args.device, "workers": args.workers}
    return name, conf.replace(**{k: v for k, v in runtime.items() if v is not None})


def _index_conf(args: argparse.Namespace, manifest: dict | None) -> IndexConf:
    from lookalike.index import IndexConf, get_index_conf

    if args.factory is not None:
        return IndexConf(factory=args.factory)
    if args.index_preset is not None:
        return get_index_conf(args.index_preset)
    return IndexConf.from_dict(manifest["index"]) if manifest is not None else IndexConf()


def _path_forms(path: Path) -> list[str]:
    """The ways an indexed file may be stored: absolute as given, and fully resolved."""
    absolute = os.path.abspath(path.expanduser())
    return list(dict.fromkeys([absolute, str(Path(absolute).resolve())]))


# -- commands --------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace, ui: _Ui) -> int:
    from lookalike.indexing import index_folder

    manifest = _manifest_of(args.index)
    _, conf = _extract_conf(args, manifest)
    index_conf = _index_conf(args, manifest)
    with ui.bars() as bars:
        report = index_folder(
            args.dir,
            args.index,
            conf,
            index_conf,
            remove_missing=args.remove_missing,
            progress=bars.callback("indexing", "img"),
            chunk=args.chunk,
        )
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
    print(f"  {'seconds':<10} {report.seconds:.2f}")
    print(f"  {'images/s':<10} {report.images_per_second:.1f}")
    print(f"  {'whitening':<10} {'learned' if report.whitening_learned else 'not learned'}")
    if report.missing:
        print(f"  ({report.missing} indexed files are gone from disk; --remove-missing drops them)")
    return 0


def cmd_search(args: argparse.Namespace, ui: _Ui) -> int:
    from lookalike.search import Searcher, hit_to_dict

    if not args.images and not args.ids:
        raise ConfigError("nothing to search: give query IMAGE files and/or --id IDS")
    box = parse_box(args.box) if args.box else None
    rotations = parse_rotations(args.rotations) if args.rotations else None
    answers: list[tuple[str, list[Hit]]] = []
    with Searcher(args.index, device=args.device) as searcher:
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
                scores, ids = searcher.search_files([path], args.k, [box], rotations)
                answers.append((str(path), searcher.results(scores, ids)[0]))
                if update:
                    update(done, len(args.images))
        if args.ids:
            scores, ids = searcher.search_ids(args.ids, args.k)
            hits = searcher.results(scores, ids)
            answers.extend((r.path, h) for r, h in zip(records, hits, strict=True))
    if args.json:
        for query, hits in answers:
            results = [{**hit_to_dict(h), "score": round(h.score, 6)} for h in hits]
            print(json.dumps({"query": query, "results": results}, ensure_ascii=False))
        return 0
    from rich.table import Table

    console = _stdout_console()
    for query, hits in answers:
        table = Table(title=f"{query}: {len(hits)} results", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id", justify="right")
        table.add_column("path", overflow="fold")
        for hit in hits:
            table.add_row(str(hit.rank), f"{hit.score:.4f}", str(hit.id), hit.path)
        console.print(table)
    return 0


def cmd_remove(args: argparse.Namespace, ui: _Ui) -> int:
    from lookalike.index import IndexStore

    if bool(args.ids) == bool(args.paths):
        raise ConfigError("give either --id IDS or image PATHS to remove (not both)")
    with IndexStore.open(args.index, writable=True) as store:
        if args.ids:
            asked, removed = len(set(args.ids)), store.remove(args.ids)
        else:
            asked = len(set(args.paths))
            removed = store.remove_paths([form for p in args.paths for form in _path_forms(p)])
    print(f"removed {removed} image{'s' if removed != 1 else ''} from {args.index}")
    if removed < asked:
        print(f"({asked - removed} of the {asked} given were not in the index)")
    return 0


def _info(store: IndexStore) -> dict:
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
        "failed": failed,
    }


def cmd_info(args: argparse.Namespace, ui: _Ui) -> int:
    from lookalike.index import IndexStore

    with IndexStore.open(args.index) as store:
        info = _info(store)
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
    for key, value in rows:
        print(f"{key:<11} {value}")
    if info["failed"]:
        print(f"failed files ({len(info['failed'])}):")
        for row in info["failed"][:MAX_INFO_FAILED_SHOWN]:
            print(f"  [{row['id']}] {row['path']}: {row['error']}")
        if len(info["failed"]) > MAX_INFO_FAILED_SHOWN:
            print(f"  ... and {len(info['failed']) - MAX_INFO_FAILED_SHOWN} more (see --json)")
    return 0


def cmd_eval(args: argparse.Namespace, ui: _Ui) -> int:
    import tempfile

    from lookalike.evaluate import evaluate_dataset, load_dataset

    dataset = load_dataset(args.dataset, args.root)
    manifest = _manifest_of(args.index)
    name, conf = _extract_conf(args, manifest)
    index_conf = _index_conf(args, manifest)
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        index_dir = args.index if args.index is not None else Path(tmp) / "index"
        with ui.bars() as bars:
            callbacks = {
                "index": bars.callback("indexing", "img"),
                "search": bars.callback("queries", "query"),
            }
            result = evaluate_dataset(
                dataset,
                index_dir,
                conf,
                index_conf,
                progress=lambda stage, done, total: callbacks[stage](done, total),
                chunk=args.chunk,
            )
    result = {"dataset": result.pop("dataset"), "preset": name, **result}
    from rich.table import Table

    table = Table(title=f"{args.dataset} {result['dataset']}, preset {name}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, "n/a" if value is None else str(value))
    table.add_section()
    for key in ("images", "failed", "queries", "index_seconds", "images_per_second", "query_ms"):
        table.add_row(key, str(result[key]))
    _stdout_console().print(table)
    if args.json is not None:
        args.json.expanduser().parent.mkdir(parents=True, exist_ok=True)
        args.json.expanduser().write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _show(value: object) -> str:
    """A setting in a table cell: ``1, 2`` for sequences, ``a=1 b=2`` for dicts."""
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def cmd_presets(args: argparse.Namespace, ui: _Ui) -> int:
    from rich.table import Table

    from lookalike.extract import EXTRACT_PRESETS
    from lookalike.index import INDEX_PRESETS

    extract = Table(title="extract presets (--preset)", title_justify="left")
    for column in ("name", "model", "image size", "scales", "pooling", "whitening", "rotations"):
        extract.add_column(column)
    for name, c in EXTRACT_PRESETS.items():
        white = "off" if c.whitening is None else _show(vars(c.whitening))
        pooling = f"gem p={c.gem_p}" if c.pooling == "gem" else c.pooling
        row = (c.model, c.image_size, c.scales, pooling, white, c.query_rotations)
        extract.add_row(name, *map(_show, row))
    index = Table(title="index presets (--index-preset)", title_justify="left")
    for column in ("name", "factory", "nprobe", "ef_search"):
        index.add_column(column)
    for name, ic in INDEX_PRESETS.items():
        index.add_row(name, ic.factory, str(ic.nprobe), str(ic.ef_search))
    console = _stdout_console()
    console.print(extract)
    console.print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
