"""The descriptor model: shapes, a learned GeM p, and the ONNX path indexing runs (the
exported backbone, then the head) agreeing with PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lookalike.errors import ConfigError
from lookalike.models import create_backbone
from lookalike.train.model import DescriptorModel, LearnedGeM


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet_lite0")


def test_descriptors_are_unit_rows_of_dim(backbone) -> None:
    model = DescriptorModel(backbone, dim=64).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 96, 96))
    assert y.shape == (2, 64)
    np.testing.assert_allclose(torch.linalg.vector_norm(y, dim=1).numpy(), 1.0, rtol=1e-5)
    plain = DescriptorModel(backbone, pooling="rmac", dim=None).eval()
    with torch.no_grad():
        assert plain(torch.randn(1, 3, 96, 96)).shape == (1, backbone.out_channels)


def test_gem_p_is_learned() -> None:
    pool = LearnedGeM(3.0)
    x = torch.rand(4, 8, 5, 5)
    pool(x).sum().backward()
    assert pool.p.grad is not None and float(pool.p.grad) != 0.0
    with pytest.raises(ConfigError, match="p must be > 0"):
        LearnedGeM(0.0)


def test_rgem_is_rmac_regions_pooled_by_gem_with_a_learned_p() -> None:
    from lookalike import functional as F
    from lookalike.train.model import LearnedRGeM

    pool = LearnedRGeM(2.0, levels=2)
    x = torch.rand(2, 8, 7, 9)
    want = F.l2n(F.gem(x, 2.0))  # the whole map, then each region
    for y0, x0, side in F.rmac_regions(7, 9, 2):
        want = want + F.l2n(F.gem(x[..., y0 : y0 + side, x0 : x0 + side], 2.0))
    torch.testing.assert_close(pool(x), want)
    pool(x).sum().backward()
    assert pool.p.grad is not None


def test_the_head_trains_while_the_backbone_is_frozen(backbone) -> None:
    model = DescriptorModel(backbone, dim=32).train()
    model.backbone.eval()  # frozen: its batch norms keep their statistics too
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.SGD(model.head_parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.head_parameters()]
    frozen = next(model.backbone.parameters()).detach().clone()
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    optimiser.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.head_parameters(), strict=True))
    assert torch.equal(frozen, next(model.backbone.parameters()))
    for p in model.backbone.parameters():
        p.requires_grad_(True)


def test_the_onnx_backbone_then_the_head_match_pytorch(backbone, lookalike_cache) -> None:
    from lookalike.runtime import OnnxRunner

    torch.manual_seed(0)
    model = DescriptorModel(backbone, dim=128)
    model.train()
    model.backbone.eval()  # the backbone as exported (its graph is cached by weights)
    with torch.no_grad():  # head batch-norm statistics that are not the identity
        model(torch.randn(8, 3, 96, 96))
    model.eval()
    images = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        want = model(images)
        got = model.embed(OnnxRunner(backbone, lookalike_cache)(images.numpy()))
    cosine = (want * got).sum(dim=1)
    assert cosine.min() > 0.999, cosine


def test_early_stages_are_the_stem_and_the_first_blocks(backbone) -> None:
    model = DescriptorModel(backbone, dim=16)
    net = backbone.model
    assert model.early_stages(0) == []
    assert model.early_stages(2) == [net.conv_stem, net.bn1, net.blocks[0]]
    assert model.early_stages(4)[-1] is net.blocks[2]
    with pytest.raises(ConfigError, match="stages to freeze"):
        model.early_stages(99)


def test_frozen_stages_stay_as_they_were_through_training(tmp_path) -> None:
    from conftest import write_images

    from lookalike.train.conf import TrainConf
    from lookalike.train.loop import train
    from lookalike.train.model_dir import load_model

    for c in range(2):
        write_images(tmp_path / "data" / f"c{c}", 8)
    conf = TrainConf(sizes=((64, 1),), freeze_epochs=0, frozen_stages=3, batch_size=8,
                     index_size=64, workers=0, dim=16)  # fmt: skip
    trained = load_model(train(tmp_path / "data", conf, tmp_path / "m")).model.backbone.model
    start = create_backbone("efficientnet_lite0").model
    for name, value in start.state_dict().items():
        if name.startswith("classifier"):  # ImageNet's classifier: not part of a descriptor
            continue
        early = name.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1."))
        same = torch.equal(value, trained.state_dict()[name])
        assert same == early or "num_batches_tracked" in name, name
