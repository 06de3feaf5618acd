"""Fixtures shared by every test module: one ONNX cache per session, test images, a model.

* ``lookalike_cache`` (session, autouse): a temporary ``$LOOKALIKE_CACHE``, so the ONNX
  graph is exported once per session, by the first test that needs it; subprocesses
  inherit the variable.
* ``make_images`` / :func:`write_images`: folders of small, distinct photos (crops of
  scikit-image's bundled pictures: real texture, so descriptors of different images differ
  as they would for real photos, unlike flat synthetic shapes).
* ``default_extractor`` (session): an :class:`Extractor` for the ``default`` preset.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import index_helpers
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from lookalike.index import IndexStore

# Bundled with scikit-image (no download): unrelated, textured scenes, six in colour.
PHOTOS = (
    "chelsea",
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
)


@functools.cache
def photo(name: str, side: int = 128) -> Image.Image:
    """A scikit-image sample photo as RGB, resized so its long side is ``side`` pixels."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def distinct_image(i: int, side: int = 64) -> Image.Image:
    """Image number ``i``: a ``side`` x ``side`` crop of one photo, different for every ``i``.

    The first ``len(PHOTOS)`` are whole different photos; later ones are other crops and
    flips of them.
    """
    base = photo(PHOTOS[i % len(PHOTOS)], 3 * side if i >= len(PHOTOS) else side)
    if i < len(PHOTOS):
        return base.resize((side, side), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(i)
    x = int(rng.integers(0, base.width - side + 1))
    y = int(rng.integers(0, base.height - side + 1))
    crop = base.crop((x, y, x + side, y + side))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (i // len(PHOTOS)) % 2 else crop


def near_duplicate(img: Image.Image, k: int) -> Image.Image:
    """Variant ``k`` >= 1 of ``img``: brighter, cropped by ``2k`` px, JPEG-compressed."""
    out = ImageEnhance.Brightness(img).enhance(1.0 + 0.05 * k)
    m = 2 * k
    out = out.crop((m, m, img.width - m, img.height - m))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=85)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def write_images(folder: Path, n: int, side: int = 64, suffix: str = ".png") -> list[Path]:
    """Write ``n`` distinct images ``img000.png``... into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}{suffix}"
        distinct_image(i, side).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session", autouse=True)
def lookalike_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session cache dir for exported ONNX graphs, also set as ``$LOOKALIKE_CACHE``."""
    path = tmp_path_factory.mktemp("lookalike-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE", str(path))
        yield path


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., list[Path]]:
    """``make_images(n, side=64, name="images", suffix=".png")``: distinct images in tmp_path."""

    def make(n: int, side: int = 64, name: str = "images", suffix: str = ".png") -> list[Path]:
        return write_images(tmp_path / name, n, side, suffix)

    return make


@pytest.fixture(scope="session")
def default_extractor(lookalike_cache: Path):
    """An Extractor for the ``default`` preset (decoding in-process), loaded once. Read-only."""
    from lookalike.extract import Extractor, get_preset

    return Extractor(get_preset("default").replace(workers=0), cache_dir=lookalike_cache)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory, default_extractor) -> tuple[Path, Path]:
    """``(folder, index)``: 6 images indexed with the default preset (read-only)."""
    from lookalike.indexing import index_folder

    base = tmp_path_factory.mktemp("small")
    folder = base / "images"
    write_images(folder, 6, side=64)
    index_folder(folder, base / "index", default_extractor.conf, extractor=default_extractor)
    return folder, base / "index"


@pytest.fixture
def build(default_extractor):
    """``build(folder, index, **options)``: :func:`index_folder` with the session model."""
    from lookalike.indexing import index_folder

    def run(folder: Path, index: Path, **options: object):
        return index_folder(
            folder, index, default_extractor.conf, extractor=default_extractor, **options
        )

    return run


# -- index store fixtures (tests/test_index_*.py) -----------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "index"


@pytest.fixture
def filled(root: Path) -> tuple[Path, np.ndarray, list[int]]:
    """An index of 200 images, checkpointed, closed."""
    x = index_helpers.unit(200)
    with IndexStore.create(root, index_helpers.DESCRIPTOR, index_helpers.D) as store:
        ids = store.add(index_helpers.images(200), x)
        store.checkpoint()
    return root, x, ids


@contextlib.contextmanager
def read_only_view(folder: Path):
    """``folder`` seen through a read-only bind mount (root), or made unwritable with chmod
    (other users); skips where neither can stop this process from writing."""
    target = folder.parent / f"{folder.name}-ro"
    target.mkdir()
    mounted = False
    if os.geteuid() == 0:
        for cmd in (["mount", "--bind", str(folder), str(target)],
                    ["mount", "-o", "remount,ro,bind", str(target)]):  # fmt: skip
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                subprocess.run(["umount", str(target)], capture_output=True)
                target.rmdir()
                pytest.skip("running as root without mount: cannot make a directory read-only")
        mounted = True
    else:
        target.rmdir()
        target = folder
        target.chmod(0o555)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("the directory stays writable for this process")
        yield target
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=True)
            target.rmdir()
        else:
            folder.chmod(0o755)


@pytest.fixture
def computations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full DBA computations (``DBAIndex.compute`` calls) of this process."""
    calls: list[int] = []
    from lookalike.rerank.dba import DBAIndex

    compute = DBAIndex.compute.__func__  # type: ignore[attr-defined]

    def counting(cls, source, k, alpha, live):  # type: ignore[no-untyped-def]
        calls.append(len(live.ids))
        return compute(cls, source, k, alpha, live)

    monkeypatch.setattr(DBAIndex, "compute", classmethod(counting))
    return calls
