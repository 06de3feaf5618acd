"""The model directory training writes and indexing reads.

::

    MODEL_DIR/
      model.json      what the model is: backbone, pooling (and its learned p), projection,
                      dim, input sizes, normalisation, classes and counts, the training
                      settings, a fingerprint of the data, per-epoch validation metrics,
                      library versions, and the content hash of weights.pt
      weights.pt      the descriptor model's state dict (the best epoch by validation)
      checkpoint.pt   the training state after the last finished epoch (``--resume``)

Every file is replaced atomically, so a killed run leaves the previous complete one.
Loading checks the weights against the recorded hash (a replaced or damaged file is refused)
and needs neither pytorch-metric-learning nor the training data.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lookalike.errors import ConfigError
from lookalike.models import create_backbone, tensor_hash
from lookalike.storage import atomic_write_bytes

MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"
CHECKPOINT = "checkpoint.pt"
KIND = "lookalike-descriptor-model"
FORMAT = 1
TRAINED_POOLING = "trained"  # ExtractConf.pooling of a trained model: its own head


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a lookalike model (its ``model.json``)."""
    return (Path(path).expanduser() / MODEL_JSON).is_file()


def write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_info(model_dir: str | Path) -> dict:
    """The model directory's ``model.json``, checked.

    Raises:
        ConfigError: no model directory, or a ``model.json`` that is not one of ours.
    """
    root = Path(model_dir).expanduser()
    path = root / MODEL_JSON
    if not path.is_file():
        raise ConfigError(
            f"{root} is not a lookalike model directory (no {MODEL_JSON}); `lookalike train` "
            "writes one"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise ConfigError(f"{path} does not describe a lookalike model")
    if info.get("format") != FORMAT:
        raise ConfigError(
            f"{path} has model format {info.get('format')}; this lookalike reads {FORMAT}: "
            "upgrade lookalike"
        )
    for key in ("backbone", "pooling", "dim", "weights"):
        if key not in info:
            raise ConfigError(f"{path} lacks {key!r}: not a complete lookalike model")
    return info


@dataclass
class LoadedModel:
    """A model directory's descriptor model (eval mode) and what ``model.json`` says."""

    model: torch.nn.Module  # lookalike.train.model.DescriptorModel
    info: dict
    weights_hash: str  # content hash of the state dict (recorded by indexes built with it)


def build_model(info: dict) -> torch.nn.Module:
    """An untrained :class:`~lookalike.train.model.DescriptorModel` shaped as ``info`` says
    (the backbone's own weights only; nothing is downloaded)."""
    from lookalike.train.model import DescriptorModel

    backbone = create_backbone(info["backbone"]["name"], pretrained=False)
    pooling = info["pooling"]
    projection = info.get("projection")
    return DescriptorModel(
        backbone,
        pooling["name"],
        None if projection is None else int(projection["dim"]),
        float(pooling.get("p") or 3.0),
    )


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a trained descriptor model.

    Raises:
        ConfigError: not a model directory, weights missing, damaged or not matching
            ``model.json``.
    """
    root = Path(model_dir).expanduser()
    info = read_info(root)
    path = root / WEIGHTS
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model {root} has no {WEIGHTS}: it was never completed") from None
    except Exception as error:  # torch raises many types for a bad file
        raise ConfigError(f"cannot read {path}: {error}") from None
    digest = tensor_hash(state)
    if digest != info["weights"].get("hash"):
        raise ConfigError(
            f"{path} is not the weights {MODEL_JSON} describes (content hash {digest}, "
            f"recorded {info['weights'].get('hash')}): damaged or replaced; train again"
        )
    model = build_model(info)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(
            f"{path} does not fit the model {MODEL_JSON} describes: {error}"
        ) from None
    model.eval()
    model.backbone.weights_id = digest  # the ONNX cache and the index know the whole model
    return LoadedModel(model, info, digest)


def describe_model(model: torch.nn.Module) -> dict:
    """The architecture part of ``model.json`` for a DescriptorModel."""
    p = getattr(model.pool, "p", None)
    return {
        "backbone": {
            "name": model.backbone.name,
            "channels": model.backbone.out_channels,
        },
        "pooling": {
            "name": model.pooling,
            "p": None if p is None else round(float(torch.as_tensor(p).detach().clamp(min=1.0)), 4),
        },
        "projection": None
        if isinstance(model.head, torch.nn.Identity)
        else {"dim": model.dim, "batch_norm": True},
        "dim": model.dim,
        "normalisation": {"mean": list(model.backbone.mean), "std": list(model.backbone.std)},
    }


def extract_conf(model_dir: str | Path, **overrides: object):
    """The :class:`~lookalike.extract.ExtractConf` that indexes with a trained model: its
    own head (pooling ``trained``), one scale, the size the model was trained to be
    described at, and a PCA-whitening learned from the indexed collection as the default
    preset has (to at most 256-d, once the collection holds twice as many images as the
    model has dimensions; measured on Grocery val: P@1 82.8 against 81.1 without,
    docs/benchmarks.md)."""
    from lookalike.extract import ExtractConf, get_preset

    root = Path(model_dir).expanduser().resolve()
    info = read_info(root)
    whitening = get_preset("default").whitening
    if whitening is not None and whitening.dim is not None:
        # one sample per image (not R-MAC's regions): learned once the collection has
        # twice as many images as the model has dimensions
        dim = int(info["dim"])
        whitening = dataclasses.replace(
            whitening, dim=min(whitening.dim, dim), min_images=max(whitening.min_images, 2 * dim)
        )
    conf = ExtractConf(
        model=info["backbone"]["name"],
        weights=str(root),
        pooling=TRAINED_POOLING,
        image_size=int(info.get("input_size", {}).get("index", 512)),
        whitening=whitening,
    )
    return conf.replace(**overrides) if overrides else conf


__all__ = [
    "CHECKPOINT",
    "MODEL_JSON",
    "TRAINED_POOLING",
    "WEIGHTS",
    "LoadedModel",
    "build_model",
    "describe_model",
    "extract_conf",
    "is_model_dir",
    "load_model",
    "read_info",
    "write_json",
    "write_torch",
]
