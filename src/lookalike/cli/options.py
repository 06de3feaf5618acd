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
    from lookalike.local.conf import VerifyConf

DESCRIPTOR_OPTIONS = ("model", "weights", "image_size", "pooling")  # ExtractConf fields
DEVICES = ("auto", "cpu", "cuda")
# Spelled out so that `lookalike --help` imports no OpenCV; tests compare them with the
# registries (lookalike.local.LOCAL_FEATURES, lookalike.local.FUSIONS).
LOCAL_CHOICES = ("sift", "rootsift", "orb", "akaze", "aliked")
FUSION_CHOICES = ("inliers", "sim_sqrt_inliers", "sim_plus_inliers")


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


def add_local_options(p: argparse.ArgumentParser, at_index: bool) -> None:
    """Local-feature options: what ``index --local`` stores, how ``verify`` matches."""
    g = p.add_argument_group("local features and geometric verification")
    if at_index:
        g.add_argument(
            "--local",
            choices=LOCAL_CHOICES,
            metavar="NAME",
            help="also store local features for `search --rerank verify`: "
            + ", ".join(LOCAL_CHOICES)
            + " (aliked is the measured default; kept current by later runs)",
        )
        g.add_argument("--local-keypoints", type=int_at_least(1), help="keypoints per image")
        g.add_argument("--local-side", type=int_at_least(32), help="detector long side, px")
    else:
        g.add_argument(
            "--local",
            choices=LOCAL_CHOICES,
            metavar="NAME",
            help="local features for verify when the index has none: computed on first "
            "use and cached in the index (default: the index's, else aliked)",
        )
        g.add_argument("--verify-budget", type=int_at_least(1), help="top results verified (100)")
        g.add_argument("--fusion", choices=FUSION_CHOICES, help="verified score (sim_plus_inliers)")
    g.add_argument(
        "--local-weights",
        metavar="PATH",
        help="ALIKED checkpoint (aliked-n16.pth); default: kornia downloads it",
    )


def local_weights(args: argparse.Namespace) -> str | None:
    if args.local_weights is None:
        return None
    path = Path(args.local_weights).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--local-weights {args.local_weights}: no such file")
    return str(path)


def index_verify_conf(args: argparse.Namespace) -> VerifyConf | None:
    """What ``index --local NAME [...]`` asks to store; None without ``--local``."""
    from lookalike.local.conf import local_preset

    if args.local is None:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("local_keypoints", "local_side", "local_weights")
            if getattr(args, k) is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} need --local NAME")
        return None
    conf = local_preset(args.local)
    changes = {
        "max_keypoints": args.local_keypoints,
        "max_side": args.local_side,
        "weights": local_weights(args),
        "device": args.device,
    }
    return conf.replace(**{k: v for k, v in changes.items() if v is not None})


def verify_overrides(args: argparse.Namespace, rerank: list[str]) -> dict:
    """Changes that ``search`` / ``recognize`` options make to the index's verify settings.

    Raises:
        ConfigError: verification options without ``verify`` among the ``rerank`` stages.
    """
    from lookalike.local.conf import local_preset

    given = [
        f"--{k.replace('_', '-')}"
        for k in ("local", "local_weights", "verify_budget", "fusion")
        if getattr(args, k) is not None
    ]
    if given and "verify" not in rerank:
        raise ConfigError(f"{', '.join(given)} apply to verification: add --rerank verify")
    changes: dict[str, object] = {"device": args.device}
    if args.local is not None:
        preset = local_preset(args.local)
        for key in ("features", "max_keypoints", "max_side", "ratio"):
            changes[key] = getattr(preset, key)
    if args.local_weights is not None:
        changes["weights"] = local_weights(args)
    if args.verify_budget is not None:
        changes["budget"] = args.verify_budget
    if args.fusion is not None:
        changes["fusion"] = args.fusion
    return changes


def parse_rerank(text: str) -> list[str]:
    """``"dba,alpha-qe,verify"`` -> stage names (validated when the searcher builds them)."""
    return [name.strip() for name in text.split(",") if name.strip()]
