"""Where the backbone runs: ONNX Runtime on CPU (several times faster than eager PyTorch
there), PyTorch with autocast on CUDA, eager PyTorch as the plain reference.

A runner maps a normalised batch ``(B, 3, H, W)`` float32 to the feature map
``(B, C, h, w)`` float32 on the CPU. All descriptor maths after it (pooling, multi-scale,
normalisation) is shared, so both paths give the same descriptors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lookalike.errors import ConfigError
from lookalike.models import Backbone

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "torch")
ONNX_OPSET = 17
EXPORT_VERSION = 1  # bump when the export code changes: invalidates cached graphs


class Runner(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> torch.Tensor: ...


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; validates the name."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return device


def default_cache_dir() -> Path:
    """``$LOOKALIKE_CACHE`` or ``~/.cache/lookalike``."""
    env = os.environ.get("LOOKALIKE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lookalike"


class TorchRunner:
    """PyTorch inference; float16 autocast on CUDA."""

    def __init__(self, backbone: Backbone, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.name = f"torch-{self.device.type}"

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        with torch.autocast(
            self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"
        ):
            y = self.backbone(x)
        return y.float().cpu()


def onnx_cache_key(backbone: Backbone) -> str:
    """Key of an exported graph: model, weights, exporter and input layout."""
    desc = {
        "model": backbone.name,
        "weights": backbone.weights_id,
        "torch": torch.__version__,
        "opset": ONNX_OPSET,
        "export": EXPORT_VERSION,
        "input": "NCHW-float32-dynamic",
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def export_onnx(backbone: Backbone, cache_dir: Path) -> Path:
    """Export ``backbone`` once to ``cache_dir/onnx/<name>-<key>.onnx`` (atomic) and return it."""
    out_dir = Path(cache_dir) / "onnx"
    path = out_dir / f"{backbone.name.replace('/', '_')}-{onnx_cache_key(backbone)}.onnx"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("exporting %s to ONNX (once): %s", backbone.name, path)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".onnx.tmp")
    os.close(fd)
    try:
        # The TorchScript exporter (dynamo=False) takes ~1 s; the dynamo exporter takes
        # minutes on this backbone and gives the same graph.
        with warnings.catch_warnings():
            # the TorchScript exporter is deprecated in favour of dynamo, which is 100x slower here
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                backbone.cpu().eval(),
                (torch.zeros(1, 3, 256, 320),),
                tmp,
                input_names=["image"],
                output_names=["features"],
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxRunner:
    """ONNX Runtime on the CPU, with the graph exported once and cached on disk."""

    def __init__(
        self, backbone: Backbone, cache_dir: Path | None = None, threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        path = export_onnx(backbone, cache_dir or default_cache_dir())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path
        self.name = "onnx-cpu"

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"image": x})[0])


def create_runner(
    backbone: Backbone, runtime: str = "auto", device: str = "auto", cache_dir: Path | None = None
) -> Runner:
    """Pick the runner: ``auto`` is ONNX Runtime on CPU and PyTorch on CUDA."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    device = resolve_device(device)
    if runtime == "onnx" and device != "cpu":
        raise ConfigError("the ONNX runtime runs on the CPU here; use --runtime torch for CUDA")
    if runtime == "onnx" or (runtime == "auto" and device == "cpu"):
        return OnnxRunner(backbone, cache_dir)
    return TorchRunner(backbone, device)
