"""Image loading that never surprises: any common file in any PIL mode to upright RGB.

Every image enters through :func:`decode_image` / :func:`load_image` (or raises an ImageError
naming the file); :func:`decode_many` streams files through worker processes for indexing.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import math
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from lookalike.errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
MAX_PIXELS: int = 120_000_000  # more pixels than this is refused (decompression bombs)

# PIL decoders tried on open; anything else (EPS runs Ghostscript, ...) is refused. MPO (camera
# multi-picture JPEG) opens through the JPEG entry.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# The leading bytes of each format above (as PIL's own checks read them): a file that starts
# otherwise is refused after reading these, not the whole file.
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG, MPO
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little- and big-endian, classic and BigTIFF (and what PIL also takes)
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"MM*\x00",
    b"II\x00*",
)
_HEAD_BYTES = 16  # bytes read to check the magic
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass
class Decoded:
    """One file from :func:`decode_many`; ``error`` is set (and ``image`` None) when unusable."""

    index: int  # position in the input sequence
    path: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB after resizing; None on error
    width: int | None = None  # upright size before resizing, pixels; None on error
    height: int | None = None
    size: int | None = None  # file size, bytes; None when the file could not be read
    mtime: float | None = None  # file modification time, seconds since the epoch
    content_hash: str | None = None  # file_hash of the bytes
    error: str | None = None  # one-line reason the file could not be used


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` by extension (any case), sorted, hidden names skipped.

    Symlinked folders are followed once each (a link loop is not walked twice). Symbolic
    links with an image name whose target is missing or that loop are listed too, so that
    indexing records them as failed files with the reason (reading one raises
    :class:`ImageError`). An empty folder gives ``[]``; unreadable sub-folders are logged and
    skipped.

    Raises:
        ImageError: ``root`` does not exist or is not a directory.
    """
    root = Path(root)
    if not root.exists():
        raise ImageError(f"Image folder {root} does not exist; check the path.")
    if not root.is_dir():
        raise ImageError(f"{root} is not a directory; give the folder that holds the images.")

    def wanted(name: str) -> bool:
        return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS

    if not recursive:
        return sorted(p for p in root.iterdir() if wanted(p.name) and _is_listed(p))

    def on_error(exc: OSError) -> None:
        logger.warning("Skipping unreadable folder %s: %s", exc.filename, exc.strerror)

    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        found.extend(base / f for f in filenames if wanted(f) and _is_listed(base / f))
    return sorted(found)


def _is_listed(path: Path) -> bool:
    """A regular file (through links), or a symbolic link that dangles or loops."""
    try:
        # exists() is False for a link that dangles or loops (ENOENT, ELOOP)
        return path.is_file() or (path.is_symlink() and not path.exists())
    except OSError:  # an entry that vanished meanwhile
        return False


def file_hash(data: bytes) -> str:
    """Content hash of a file's bytes: hex BLAKE2b with a 16-byte digest (32 characters)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white.

    16-bit modes (``I;16*``) are divided by 257. ``I`` and ``F`` have no declared range, so
    it is read from the values: up to 1.0 (``F`` only) is scaled by 255, up to 255 kept, up
    to 65535 treated as 16-bit, anything larger scaled by the maximum.
    """
    if img.mode in _HIGH_DEPTH_MODES:
        arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            full = 65535.0
        elif img.mode == "F" and peak <= 1.0:
            full = 1.0
        else:
            full = 255.0 if peak <= 255.0 else max(peak, 65535.0)
        gray = np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if "transparency" in img.info or img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(
    path: str | Path,
    max_side: int | None = None,
    box: tuple[float, float, float, float] | None = None,
    upscale: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Read and decode one image file; see :func:`decode_image` for the steps.

    Raises:
        ImageError: The file is missing, empty, unreadable, corrupt, truncated or too large.
    """
    return _decode(_read(path), max_side, box, upscale, max_pixels, str(path))[0]


def read_image(
    source: str | Path | bytes | Image.Image,
    max_side: int | None = None,
    box: tuple[float, float, float, float] | None = None,
    upscale: bool = False,
    name: str | None = None,
) -> Image.Image:
    """An upright RGB image from a file path, encoded bytes or a PIL image.

    Files and bytes go through :func:`decode_image` (EXIF orientation, any mode, size
    limits); a PIL image is taken as upright, converted to RGB (:func:`to_rgb`), cropped to
    ``box`` and resized the same way.

    Raises:
        ImageError: unreadable, corrupt or too large; ConfigError: an unsupported type.
    """
    if isinstance(source, str | Path):
        return load_image(source, max_side, box, upscale)
    if isinstance(source, bytes | bytearray | memoryview):
        return decode_image(bytes(source), max_side, box, upscale, name=name or "<bytes>")
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        width, height = source.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"Image {label} is {width}x{height} pixels, over the limit.")
        try:
            img = to_rgb(source)
        except Exception as exc:  # an image object that cannot be converted
            raise ImageError(f"Cannot convert image {label} to RGB: {exc}") from exc
        if box is not None:
            img = _crop(img, box, label)
        return resize_long_side(img, _check_max_side(max_side), upscale)
    raise ConfigError(
        f"an image must be a file path, bytes or a PIL image, got {type(source).__name__}"
    )


def decode_image(
    data: bytes,
    max_side: int | None = None,
    box: tuple[float, float, float, float] | None = None,
    upscale: bool = False,
    max_pixels: int = MAX_PIXELS,
    name: str = "<bytes>",
) -> Image.Image:
    """Decode encoded bytes to an upright RGB image.

    Steps: refuse more than ``max_pixels`` pixels (checked from the header, before decoding);
    decode JPEGs at a reduced DCT scale when ``max_side`` allows and no box is given; take the
    first frame of animations; apply the EXIF orientation; convert to RGB (:func:`to_rgb`);
    crop to ``box``; resize with Lanczos so the long side is ``max_side``.

    Args:
        data: The encoded file.
        max_side: Long side of the result, pixels; None keeps the size.
        box: ``(x1, y1, x2, y2)`` crop in pixels of the upright full-size image; clipped to it.
        upscale: Also enlarge images whose long side is below ``max_side``.
        max_pixels: Largest accepted ``width * height`` of the file.
        name: What error messages call the data (a path or upload name).

    Raises:
        ImageError: The data is empty, not a supported image, corrupt, truncated or too large,
            or ``box`` is empty inside the image.
    """
    return _decode(data, max_side, box, upscale, max_pixels, name)[0]


def _decode(
    data: bytes,
    max_side: int | None,
    box: tuple[float, float, float, float] | None,
    upscale: bool,
    max_pixels: int,
    name: str,
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` that also returns the upright ``(width, height)`` before resizing."""
    max_side = _check_max_side(max_side)
    if not data:
        raise ImageError(f"Image {name} is empty (0 bytes); re-copy or delete the file.")
    try:
        # The explicit check below is the limit; PIL's warning (at ~89 Mpx) would only be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(
                f"Image {name} is {width}x{height} = {width * height:,} pixels, over the limit "
                f"of {max_pixels:,} (max_pixels); downscale the file or raise the limit."
            )
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in (5, 6, 7, 8):  # turned by 90 degrees: report the upright size
            width, height = height, width
        if box is None and max_side is not None and img.format in ("JPEG", "MPO"):
            scale = max_side / max(width, height)
            if scale < 1.0:  # draft picks the largest 1/2, 1/4, 1/8 scale not below this size
                img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        img.load()  # decode now so truncated or corrupt data fails here, not downstream
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"Image {name} is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(_unknown_format(name)) from exc
    except Exception as exc:  # any decoder failure on untrusted bytes is a bad file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(
            f"Cannot decode image {name} ({reason}); the file is truncated or corrupt, "
            "re-export or delete it."
        ) from exc
    if box is not None:
        img = _crop(img, box, name)
    return resize_long_side(img, max_side, upscale), (width, height)


def crop_image(img: Image.Image, box: Iterable[float], name: str = "<image>") -> Image.Image:
    """Crop an upright image to ``box`` (x1, y1, x2, y2 pixels) as :func:`load_image` does."""
    return _crop(img, box, name)


def _check_max_side(max_side: int | None) -> int | None:
    try:
        if max_side is None or operator.index(max_side) >= 1:
            return None if max_side is None else operator.index(max_side)
    except TypeError:
        pass
    raise ConfigError(f"max_side must be a positive integer or None, got {max_side!r}.")


def _crop(img: Image.Image, box: Iterable[float], name: str) -> Image.Image:
    """Crop to ``box`` clipped to the image, rounding outwards to whole pixels."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"Box {box!r} for {name} must be four numbers x1, y1, x2, y2.") from exc
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ImageError(f"Box {box!r} for {name} has a non-finite coordinate.")
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(img.width, math.ceil(x2)), min(img.height, math.ceil(y2))
    if right <= left or bottom <= top:
        raise ImageError(
            f"Box {box!r} is empty inside {name} ({img.width}x{img.height}); give x1 < x2 and "
            "y1 < y2 in pixels of the upright full-size image."
        )
    return img.crop((left, top, right, bottom))


def resize_long_side(img: Image.Image, max_side: int | None, upscale: bool) -> Image.Image:
    """Resize so the long side is ``max_side`` (only down unless ``upscale``)."""
    if max_side is None:
        return img
    width, height = img.size
    long_side = max(width, height)
    if long_side == max_side or (long_side < max_side and not upscale):
        return img
    short = max(1, round(min(width, height) * max_side / long_side))
    size = (max_side, short) if width >= height else (short, max_side)
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _read(path: str | Path, seen: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The bytes of one image file, refused after its first bytes when they are no supported
    format's (a large non-image file is never read whole).

    Args:
        path: the file.
        seen: called with the file's stat (taken from the open handle) before reading.

    Raises:
        ImageError: missing, a broken or looping symbolic link, a directory, unreadable,
            or not one of the supported formats.
    """
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if seen is not None:
                seen(stat)
            head = f.read(_HEAD_BYTES)
            if head and not _known_magic(head):
                raise ImageError(_unknown_format(str(path)))
            return head + f.read()
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError(
                f"{path} is a broken symbolic link (its target {os.readlink(path)} does not "
                "exist); fix or delete the link."
            ) from None
        raise ImageError(f"Image file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a directory, not an image file.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(
                f"{path} is a symbolic link loop (it resolves to itself); fix or delete the link."
            ) from None
        raise ImageError(
            f"Cannot read image file {path}: {exc.strerror or exc}; check its permissions."
        ) from exc


def _known_magic(head: bytes) -> bool:
    """Whether ``head`` starts like one of the supported formats."""
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _unknown_format(name: str) -> str:
    return (
        f"{name} is not a readable image: unknown format or damaged header (supported: "
        "JPEG, PNG, WebP, BMP, TIFF, GIF); convert, re-export or delete the file."
    )


def _decode_one(index: int, path: str, max_side: int | None, upscale: bool) -> Decoded:
    """Read, hash and decode one file; never raises for a bad file."""
    out = Decoded(index=index, path=path)

    def seen(stat: os.stat_result) -> None:  # a file refused by its first bytes keeps its stat
        out.size, out.mtime = stat.st_size, stat.st_mtime

    try:
        data = _read(path, seen)
        out.size, out.content_hash = len(data), file_hash(data)
        img, (out.width, out.height) = _decode(data, max_side, None, upscale, MAX_PIXELS, path)
        out.image = np.array(img, dtype=np.uint8)
    except Exception as exc:  # ImageError, or a bug that must not stop a million-file run
        msg = str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc} ({path})"
        out.error = " ".join(msg.split())
    return out


def _decode_chunk(
    items: list[tuple[int, str]], max_side: int | None, upscale: bool
) -> list[Decoded]:
    """Worker entry point (module level so that spawned processes can import it)."""
    return [_decode_one(i, p, max_side, upscale) for i, p in items]


def decode_many(
    paths: Sequence[str | Path],
    max_side: int | None,
    workers: int = 2,
    upscale: bool = False,
    chunksize: int = 4,
) -> Iterator[Decoded]:
    """Read, hash and decode files in worker processes, yielding lazily in input order.

    At most ``4 * workers * chunksize`` files are in flight, so memory stays bounded for any
    number of paths while the consumer runs inference. Workers are "spawn"ed (safe beside
    torch / onnxruntime threads) and shut down when iteration ends or the generator is closed;
    on Linux they also die with the calling process however it dies (a SIGKILLed indexer
    leaves none behind). A chunk whose worker died is retried one file per process to pin the
    crash on one file (:mod:`lookalike.decoder_pool`).

    Args:
        paths: Image files.
        max_side: Long side of each image, pixels; None keeps full size.
        workers: Worker processes; 0 decodes in the calling process.
        upscale: Also enlarge images smaller than ``max_side``.
        chunksize: Files sent to a worker at a time.

    Yields:
        One :class:`Decoded` per path, bad files included (with ``error`` set).

    Raises:
        ConfigError: ``workers`` is negative, ``chunksize`` below 1 or ``max_side`` invalid.
    """
    if workers < 0 or chunksize < 1:
        raise ConfigError(
            f"decode_many needs workers >= 0 and chunksize >= 1, got {workers} and {chunksize}."
        )
    max_side = _check_max_side(max_side)
    if workers == 0:
        return (_decode_one(i, str(p), max_side, upscale) for i, p in enumerate(paths))
    from lookalike.decoder_pool import decode_in_pool

    # _decode_chunk looked up now: tests stand in a crashing one
    return decode_in_pool(_decode_chunk, paths, max_side, upscale, workers, chunksize)
