"""The descriptor model that training fine-tunes and indexing then runs.

``backbone -> pooling (GeM with a learned p, starting at 3; R-GeM; or R-MAC) -> optional linear
projection + batch norm to dim -> L2 normalisation``. The backbone is lookalike's
:class:`~lookalike.models.Backbone` (any registered or timm model), so the trained one goes
through the same ONNX export as an off-the-shelf one; :meth:`DescriptorModel.embed` is the
head that follows it (what indexing applies to the exported backbone's feature maps).
"""

from __future__ import annotations

import torch
from torch import nn

from lookalike import functional as F
from lookalike.errors import ConfigError
from lookalike.models import Backbone
from lookalike.pooling import RMAC, GeM

POOLINGS = ("gem", "rgem", "rmac")


class LearnedGeM(GeM):
    """GeM pooling (Radenovic et al. 2018) whose ``p`` is a trained parameter."""

    def __init__(self, p: float = 3.0) -> None:
        super().__init__(p)  # validates p
        self.p = nn.Parameter(torch.tensor(float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gem(x, self.p.clamp(min=1.0))  # p below 1 pools towards the minimum


class LearnedRGeM(LearnedGeM):
    """Regional GeM (R-GeM, as in cirtorch): R-MAC's regions, each pooled by GeM with the
    learned ``p``, L2-normalised and summed."""

    def __init__(self, p: float = 3.0, levels: int = 3) -> None:
        super().__init__(p)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rmac(x, self.levels, self.p.clamp(min=1.0))


class DescriptorModel(nn.Module):
    """``(B, 3, H, W)`` images (normalised as the backbone wants) to ``(B, dim)`` unit
    descriptors.

    Args:
        backbone: the feature extractor.
        pooling: ``gem`` (learned p), ``rgem`` (regional GeM, learned p) or ``rmac``.
        dim: the projection's output size; None keeps the backbone's channels (no
            projection).
        gem_p: GeM's starting p.
    """

    def __init__(
        self, backbone: Backbone, pooling: str = "gem", dim: int | None = 512, gem_p: float = 3.0
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r} for training; valid: {POOLINGS}")
        if dim is not None and dim < 1:
            raise ConfigError(f"the projection's dim must be >= 1, got {dim}")
        self.backbone = backbone
        self.pooling = pooling
        pools = {"gem": lambda: LearnedGeM(gem_p), "rgem": lambda: LearnedRGeM(gem_p)}
        self.pool: nn.Module = pools.get(pooling, RMAC)()
        channels = backbone.out_channels
        self.dim = channels if dim is None else int(dim)
        self.head: nn.Module = (
            nn.Identity()
            if dim is None
            else nn.Sequential(nn.Linear(channels, self.dim), nn.BatchNorm1d(self.dim))
        )

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The head alone: ``(B, C, h, w)`` backbone feature maps to unit descriptors."""
        return F.l2n(self.head(self.pool(features)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(images))

    def early_stages(self, count: int) -> list[nn.Module]:
        """The backbone's first ``count`` stages in timm's order (stem, then blocks: its
        ``group_matcher``), which training may keep frozen: generic low-level features,
        and a backward pass that stops before them."""
        if count <= 0:
            return []
        from timm.models import group_parameters

        net = self.backbone.model
        if not hasattr(net, "group_matcher"):
            raise ConfigError(
                f"{self.backbone.name} does not name its stages (no timm group_matcher): "
                "use frozen_stages=0"
            )
        groups = list(group_parameters(net, net.group_matcher(coarse=True)).values())
        if count >= len(groups):
            raise ConfigError(
                f"{self.backbone.name} has {len(groups) - 1} stages to freeze, got {count}"
            )
        names: dict[str, None] = {}
        for group in groups[:count]:
            for param in group:
                parts = param.split(".")
                depth = 2 if parts[0] in ("blocks", "stages", "layers") else 1
                names.setdefault(".".join(parts[:depth]), None)
        return [net.get_submodule(name) for name in names]

    def head_parameters(self) -> list[nn.Parameter]:
        """What follows the backbone (pooling, projection): trained from the first epoch,
        while the backbone may be frozen."""
        return [*self.pool.parameters(), *self.head.parameters()]


__all__ = ["POOLINGS", "DescriptorModel", "LearnedGeM", "LearnedRGeM"]
