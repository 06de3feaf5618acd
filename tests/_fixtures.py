"""Session fixtures shared by the model tests: one ONNX cache, one backbone, a few extractors.

Test modules pull these in with ``pytest_plugins = ("_fixtures",)``, which registers this
module once, so a session fixture here really is built once per session (a fixture imported
into several modules would be built once per module). Loading the model takes ~0.3 s and an
ONNX export ~3 s: tests share them and deep-copy what they change
(sentence-transformers ``conftest.py`` style).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.extract import ExtractConf, Extractor
from lookalike.models import Backbone, create_backbone

# Small images keep the real model fast on a shared 2-core machine.
TEST_CONF = ExtractConf(image_size=128, workers=0, device="cpu", batch_size=4, query_rotations=(0,))


def small(img: np.ndarray, side: int = 128) -> np.ndarray:
    """``(H, W, 3)`` uint8 resized (Lanczos) so that its long side is ``side``."""
    pil = Image.fromarray(img)
    scale = side / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    return np.asarray(pil.resize(size, Image.Resampling.LANCZOS))


@pytest.fixture(scope="session")
def torch_one_thread() -> Iterator[None]:
    """One intra-op thread for eager PyTorch from here to the end of the session.

    On a shared CI machine OpenMP threads spin against other jobs: a 128 px forward pass
    takes 0.06 s on one thread and 0.5-7 s on two busy cores. Tests check numbers, not speed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lookalike_cache(
    tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None
) -> Iterator[Path]:
    """Session cache dir for exported ONNX graphs, also set as ``$LOOKALIKE_CACHE``.

    ``tests/conftest.py`` defines the same fixture; its definition takes precedence under
    ``tests/``, so every test module shares one cache and one export. This one is the fallback.
    """
    path = tmp_path_factory.mktemp("lookalike-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def lite0_session(torch_one_thread: None) -> Backbone:
    """The default backbone (packaged EfficientNet-Lite0 weights), loaded once. Read-only."""
    return create_backbone("efficientnet_lite0")


@pytest.fixture
def lite0(lite0_session: Backbone) -> Backbone:
    """A private copy of the default backbone that a test may modify."""
    return copy.deepcopy(lite0_session)


@pytest.fixture(scope="session")
def make_extractor(lookalike_cache: Path, torch_one_thread: None) -> Callable[..., Extractor]:
    """``make_extractor(**changes)``: an Extractor for ``TEST_CONF.replace(**changes)``, cached."""
    built: dict[ExtractConf, Extractor] = {}

    def make(**changes: object) -> Extractor:
        conf = TEST_CONF.replace(**changes)
        if conf not in built:
            built[conf] = Extractor(conf, cache_dir=lookalike_cache)
        return built[conf]

    return make


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Four unrelated photos from scikit-image, long side 128 px, ``(H, W, 3)`` uint8."""
    from skimage import data

    return {
        name: small(getattr(data, name)()) for name in ("chelsea", "astronaut", "coffee", "rocket")
    }
