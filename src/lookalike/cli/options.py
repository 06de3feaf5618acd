"""Options shared by several commands: argparse types, value parsers, descriptor settings.

:func:`extract_conf` and :func:`index_conf` turn the descriptor options into the stage
configurations, preferring what an existing index records so that re-running a command on
it needs no options repeated.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.errors import ConfigError, IndexStateError

if TYPE_CHECKING:
    from lookalike.extract import ExtractConf
    from lookalike.index import IndexConf

DESCRIPTOR_OPTIONS = ("model", "weights", "image_size", "pooling")  # ExtractConf fields
DEVICES = ("auto", "cpu", "cuda")


def int_at_least(low: int) -> Callable[[str], int]:
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


def add_descriptor_options(p: argparse.ArgumentParser) -> None:
    """The options of commands that describe images into an index (``index``, ``eval``)."""
    g = p.add_argument_group("descriptor (default: the index's own settings, else 'default')")
    g.add_argument("--preset", help="extract preset (see `lookalike presets`)")
    g.add_argument("--model", help="backbone: a registered name or any timm name")
    g.add_argument("--weights", help="local checkpoint file for --model")
    g.add_argument("--image-size", type=int_at_least(1), help="long side of the images, pixels")
    g.add_argument("--pooling", help="gap, spoc, mac, gem or rmac")
    x = p.add_mutually_exclusive_group()
    x.add_argument("--factory", help="faiss index_factory string for a new index, e.g. HNSW32")
    x.add_argument("--index-preset", help="index preset for a new index (see `lookalike presets`)")
    p.add_argument("--workers", type=int_at_least(0), help="image decoding processes")
    p.add_argument("--device", choices=DEVICES, help="where the model runs")
    p.add_argument("--chunk", type=int_at_least(1), default=32, help=argparse.SUPPRESS)


def manifest_of(index_dir: Path | None) -> dict | None:
    """The manifest of an existing index, None where there is none yet."""
    from lookalike.index.manifest import MANIFEST_NAME, read_manifest

    if index_dir is None or not (index_dir.expanduser() / MANIFEST_NAME).exists():
        return None
    return read_manifest(index_dir.expanduser())


def extract_conf(args: argparse.Namespace, manifest: dict | None) -> tuple[str, ExtractConf]:
    """``(preset name, conf)``: the index's own settings unless descriptor options are given."""
    from lookalike.extract import get_preset
    from lookalike.search import conf_from_descriptor

    overrides: dict[str, object] = {
        k: getattr(args, k) for k in DESCRIPTOR_OPTIONS if getattr(args, k) is not None
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


def index_conf(args: argparse.Namespace, manifest: dict | None) -> IndexConf:
    """The faiss structure: ``--factory`` / ``--index-preset``, else the index's own."""
    from lookalike.index import IndexConf, get_index_conf

    if args.factory is not None:
        return IndexConf(factory=args.factory)
    if args.index_preset is not None:
        return get_index_conf(args.index_preset)
    return IndexConf.from_dict(manifest["index"]) if manifest is not None else IndexConf()
