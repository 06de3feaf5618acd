"""Runners: ONNX Runtime and PyTorch agree, the exported graph is cached, devices validate."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.errors import ConfigError
from lookalike.extract import Extractor
from lookalike.models import Backbone
from lookalike.runtime import (
    OnnxRunner,
    TorchRunner,
    create_runner,
    default_cache_dir,
    export_onnx,
    onnx_cache_key,
    resolve_device,
)

pytest_plugins = ("_fixtures",)
pytestmark = pytest.mark.usefixtures("torch_one_thread")

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``(N, D)`` arrays."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def views(photos: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Photos of several shapes, odd sizes included (TF-"same" padding depends on parity)."""
    return [
        photos["chelsea"],
        photos["astronaut"][:117, :99],
        photos["coffee"][:77, :121],
        photos["rocket"],
    ]


# --- agreement -------------------------------------------------------------------------------


def test_onnx_and_torch_feature_maps_agree(lite0_session: Backbone, lookalike_cache: Path) -> None:
    onnx = OnnxRunner(lite0_session, lookalike_cache)
    eager = TorchRunner(lite0_session, "cpu")
    x = np.random.default_rng(0).standard_normal((2, 3, 75, 101)).astype(np.float32)
    a, b = onnx(x), eager(x)
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == b.shape == (2, 1280, 3, 4)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize(
    ("pooling", "scales"), [("gem", (1.0,)), ("rmac", (1.0,)), ("rmac", (0.75, 1.0))]
)
def test_onnx_and_torch_descriptors_agree(
    make_extractor: Callable[..., Extractor],
    photos: dict[str, np.ndarray],
    pooling: str,
    scales: tuple[float, ...],
) -> None:
    onnx = make_extractor(runtime="onnx", pooling=pooling, scales=scales)
    eager = make_extractor(runtime="torch", pooling=pooling, scales=scales)
    assert onnx.runner.name == "onnx-cpu" and eager.runner.name == "torch-cpu"
    images = views(photos)
    a = onnx.extract_arrays(images).global_
    b = eager.extract_arrays(images).global_
    assert a.shape == b.shape == (4, 1280)
    assert cosines(a, b).min() > 0.999


# --- ONNX cache ------------------------------------------------------------------------------


def snapshot(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cache / "onnx").iterdir()}


def test_second_runner_reuses_the_export(
    lite0_session: Backbone, lookalike_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = OnnxRunner(lite0_session, lookalike_cache)
    before = snapshot(lookalike_cache)
    assert first.path.name in before
    assert first.path.name.startswith("efficientnet_lite0-")

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    second = OnnxRunner(lite0_session, lookalike_cache)
    assert second.path == first.path
    assert snapshot(lookalike_cache) == before
    x = np.zeros((1, 3, 64, 64), np.float32)
    torch.testing.assert_close(second(x), first(x))


def test_runner_uses_env_cache_dir(lite0_session: Backbone, lookalike_cache: Path) -> None:
    assert default_cache_dir() == lookalike_cache  # the session fixture set $LOOKALIKE_CACHE
    assert OnnxRunner(lite0_session).path.parent == lookalike_cache / "onnx"


def test_default_cache_dir_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_CACHE", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "lookalike"


def test_cache_key_follows_weights_and_name(lite0: Backbone, lite0_session: Backbone) -> None:
    key = onnx_cache_key(lite0_session)
    assert onnx_cache_key(lite0) == key
    lite0.weights_id = "0123456789abcdef"
    assert onnx_cache_key(lite0) != key
    lite0.weights_id = lite0_session.weights_id
    lite0.name = "renamed"
    assert onnx_cache_key(lite0) != key


@pytest.fixture
def fake_export(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the ONNX exporter by one that writes a stub file; returns the paths written."""
    written: list[str] = []

    def export(model: torch.nn.Module, args: tuple, f: str, **kwargs: object) -> None:
        written.append(f)
        Path(f).write_bytes(b"stub graph")

    monkeypatch.setattr(torch.onnx, "export", export)
    return written


def test_other_weights_export_to_a_new_file(
    lite0: Backbone, tmp_path: Path, fake_export: list[str]
) -> None:
    first = export_onnx(lite0, tmp_path)
    assert export_onnx(lite0, tmp_path) == first
    assert len(fake_export) == 1
    lite0.weights_id = "0123456789abcdef"
    second = export_onnx(lite0, tmp_path)
    assert second != first and len(fake_export) == 2
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(
        [first.name, second.name]
    )  # written atomically: no temporary files left


def test_failed_export_leaves_nothing(
    lite0: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: torch.nn.Module, args: tuple, f: str, **kwargs: object) -> None:
        Path(f).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(lite0, tmp_path)
    assert list((tmp_path / "onnx").iterdir()) == []


# --- devices and runner choice ---------------------------------------------------------------


@needs_no_cuda
def test_auto_device_is_cpu_without_cuda() -> None:
    assert resolve_device("auto") == "cpu"


def test_cpu_device() -> None:
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device", ["gpu", "tpu", "CPU", "cuda:x", "cuda:", "mps", ""])
def test_unknown_device(device: str) -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(device)


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda(device: str) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_device_count() -> None:
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_create_runner_choices(lite0: Backbone, lookalike_cache: Path) -> None:
    assert isinstance(create_runner(lite0, "auto", "cpu", lookalike_cache), OnnxRunner)
    assert isinstance(create_runner(lite0, "onnx", "cpu", lookalike_cache), OnnxRunner)
    torch_runner = create_runner(lite0, "torch", "cpu")
    assert isinstance(torch_runner, TorchRunner) and torch_runner.name == "torch-cpu"


def test_create_runner_refuses_bad_settings(lite0: Backbone) -> None:
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        create_runner(lite0, "tensorrt", "cpu")
    with pytest.raises(ConfigError):
        create_runner(lite0, "onnx", "cuda")  # ONNX runs on the CPU; or no CUDA at all


def test_torch_runner_empty_batch_nocrash(lite0_session: Backbone) -> None:
    out = TorchRunner(lite0_session, "cpu")(np.zeros((0, 3, 64, 64), np.float32))
    assert out.shape == (0, 1280, 2, 2)


# --- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_agrees_with_cpu(
    lite0_session: Backbone,
    make_extractor: Callable[..., Extractor],
    photos: dict[str, np.ndarray],
) -> None:
    runner = TorchRunner(copy.deepcopy(lite0_session), "cuda")
    assert runner.name == "torch-cuda"
    x = np.random.default_rng(0).standard_normal((2, 3, 75, 101)).astype(np.float32)
    out = runner(x)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (2, 1280, 3, 4)

    gpu = make_extractor(runtime="torch", device="cuda")
    cpu = make_extractor(runtime="torch", device="cpu")
    images = views(photos)
    a, b = gpu.extract_arrays(images).global_, cpu.extract_arrays(images).global_
    assert cosines(a, b).min() > 0.995
