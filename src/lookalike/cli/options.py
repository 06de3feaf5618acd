"""Options shared by several commands: argparse types, value parsers, option groups.

The options only name settings; choosing them (the index's own unless others are asked
for) is :func:`lookalike.indexing.resolve_settings`'s, checking local-feature options is
:mod:`lookalike.local.conf`'s.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from lookalike.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
# Spelled out so that `lookalike --help` imports no OpenCV; tests compare them with the
# registries (lookalike.local.LOCAL_FEATURES, lookalike.local.FUSIONS).
LOCAL_CHOICES = ("sift", "rootsift", "orb", "akaze", "aliked", "aliked-n16rot")
FUSION_CHOICES = ("inliers", "sim_sqrt_inliers", "sim_plus_inliers")
BACKEND_CHOICES = ("faiss", "numpy", "milvus")  # lookalike.index.conf.BACKEND_NAMES


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """An argparse ``type``: a size like ``512MB``, ``1.5G`` or ``2000000`` (binary units),
    in bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    value = 0 if match is None else int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 512MB or 1GB, got {text!r}")
    return value


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


CROPS_HELP = (
    "regional query crops searched beside the whole photo, sizes as fractions of its sides, "
    "e.g. 0.7,0.5 (2x2 and 3x3 grids); 'none': the whole photo only; default: the index's"
)


def parse_crops(text: str | None) -> tuple[float, ...] | None:
    """``"0.7,0.5"`` -> crop sizes; ``"none"`` -> ``()``; None -> None (the index's)."""
    if text is None:
        return None
    from lookalike.index.manifest import check_crops

    if text.strip().lower() in ("none", "off", ""):
        return ()
    try:
        return check_crops(text.split(","), f"--crops {text!r}")
    except ValueError as error:
        raise ConfigError(f"{error}, or 'none'") from None


def add_descriptor_options(p: argparse.ArgumentParser) -> None:
    """The options of commands that describe images into an index (``index``, ``eval``)."""
    g = p.add_argument_group("descriptor (default: the index's own settings, else 'default')")
    g.add_argument("--preset", help="extract preset (see `lookalike presets`)")
    g.add_argument(
        "--model",
        help="backbone: a registered name or any timm name; or a model directory written by "
        "`lookalike train` (its own head and size)",
    )
    g.add_argument("--weights", help="local checkpoint file for --model")
    g.add_argument("--image-size", type=int_at_least(1), help="long side of the images, pixels")
    g.add_argument("--pooling", help="gap, spoc, mac, gem or rmac")
    x = p.add_mutually_exclusive_group()
    x.add_argument("--factory", help="faiss index_factory string for a new index, e.g. HNSW32")
    x.add_argument("--index-preset", help="index preset for a new index (see `lookalike presets`)")
    p.add_argument(
        "--backend", choices=BACKEND_CHOICES, help="vector backend of a new index (faiss)"
    )
    p.add_argument(
        "--memory-budget",
        type=byte_size,
        metavar="SIZE",
        help="--index-preset auto: what its structure may hold in RAM, e.g. 512MB (1GB)",
    )
    p.add_argument("--workers", type=int_at_least(0), help="image decoding processes")
    p.add_argument("--device", choices=DEVICES, help="where the model runs")
    p.add_argument("--chunk", type=int_at_least(1), default=32, help=argparse.SUPPRESS)


SETTINGS_OPTIONS = (  # resolve_settings keywords that add_descriptor_options names
    "model", "weights", "image_size", "pooling", "factory", "index_preset", "backend",
    "memory_budget", "device", "workers",
)  # fmt: skip


def settings_options(args: argparse.Namespace) -> dict:
    """The descriptor and structure options as :func:`lookalike.indexing.resolve_settings`
    (and :func:`lookalike.evaluate.evaluate`) take them."""
    return {name: getattr(args, name) for name in SETTINGS_OPTIONS}


def settings_of(args: argparse.Namespace, index_dir: Path | None):  # -> Settings
    """The run's settings (:func:`lookalike.indexing.resolve_settings`) from the options."""
    from lookalike.indexing.settings import resolve_settings

    milvus_uri = getattr(args, "milvus_uri", None)
    return resolve_settings(index_dir, args.preset, **settings_options(args), milvus_uri=milvus_uri)


def add_milvus_options(p: argparse.ArgumentParser, uri: bool) -> None:
    """``[--milvus-uri URI] [--milvus-token-file F]``: where a ``--backend milvus`` index
    keeps its vectors, and the server's token (read at run time, never stored)."""
    g = p.add_argument_group("milvus (--backend milvus)")
    if uri:
        g.add_argument(
            "--milvus-uri",
            metavar="URI",
            help="a Milvus server or cluster for a new --backend milvus index, e.g. "
            "http://host:19530 (no credentials in it); default: Milvus Lite inside the index",
        )
    g.add_argument(
        "--milvus-token-file",
        type=Path,
        metavar="FILE",
        help="file holding the Milvus server's token (user:password or an API key), read "
        "for this run and never stored; also $LOOKALIKE_MILVUS_TOKEN_FILE",
    )


def use_milvus_token(args: argparse.Namespace) -> None:
    """Read ``--milvus-token-file`` for this run (``ConfigError`` if unreadable or empty)."""
    path = getattr(args, "milvus_token_file", None)
    if path is not None:
        from lookalike.index.backends.milvus_client import use_token_file

        use_token_file(path)


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
            "use and cached in the index (default: the index's, else aliked when its "
            "weights are on disk, else rootsift)",
        )
        g.add_argument("--verify-budget", type=int_at_least(1), help="top results verified (100)")
        g.add_argument("--fusion", choices=FUSION_CHOICES, help="verified score (sim_plus_inliers)")
    g.add_argument(
        "--local-weights",
        metavar="PATH",
        help="ALIKED checkpoint (aliked-n16.pth); default: torch's cache, else kornia "
        "downloads it for --local aliked",
    )


def index_verify_conf(args: argparse.Namespace):  # -> VerifyConf | None
    """What ``index --local NAME [...]`` asks to store; None without ``--local``."""
    from lookalike.local.conf import local_conf

    return local_conf(
        args.local, args.local_keypoints, args.local_side, args.local_weights, args.device
    )


def verify_overrides(args: argparse.Namespace, rerank: list[str] | str) -> dict:
    """Changes that ``search`` / ``recognize`` options make to the index's verify settings.

    Raises:
        ConfigError: verification options without ``verify`` among the ``rerank`` stages.
    """
    from lookalike.local.conf import verify_changes

    given = [
        f"--{k.replace('_', '-')}"
        for k in ("local", "local_weights", "verify_budget", "fusion")
        if getattr(args, k) is not None
    ]
    if given and rerank != "auto" and "verify" not in rerank:
        raise ConfigError(f"{', '.join(given)} apply to verification: add --rerank verify")
    return verify_changes(
        args.local, args.local_weights, args.verify_budget, args.fusion, args.device
    )


def parse_rerank(text: str) -> list[str] | str:
    """``"dba,alpha-qe,verify"`` -> stage names (validated when the searcher builds them);
    ``"auto"`` stays ``"auto"`` (the small-gallery default); ``"none"`` -> no stage."""
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip().lower() in ("none", "off"):
        return []
    return [name.strip() for name in text.split(",") if name.strip()]
