"""The training losses: CurricularFace against the paper's formula, the dynamic margins,
every preset reducing its loss on a tiny labelled set, and P-K batches."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from lookalike.errors import ConfigError
from lookalike.train.losses import (
    CLASSIFIER,
    LOSS_PRESETS,
    CurricularFaceLoss,
    DynamicSubCenterArcFaceLoss,
    build_loss,
    dynamic_margins,
    loss_preset,
    pk_sampler,
)


def curricular_by_hand(x, w, labels, m, s, t) -> float:
    """CurricularFace (Huang et al. 2020, eq. 6-9) transcribed sample by sample: N(t,
    cos) = cos for easy negatives, cos (t + cos) for hard ones (cos > cos(theta_y + m));
    the target cos(theta_y + m) (cos(theta_y) - m sin m past pi - m); softmax CE on s x."""
    total = 0.0
    for xi, y in zip(x, labels, strict=True):
        xi = xi / np.linalg.norm(xi)
        cos = [float(xi @ (w[:, j] / np.linalg.norm(w[:, j]))) for j in range(w.shape[1])]
        theta = math.acos(max(-1.0, min(1.0, cos[y])))
        target_m = math.cos(theta + m)
        target = target_m if cos[y] > math.cos(math.pi - m) else cos[y] - m * math.sin(m)
        logits = []
        for j, c in enumerate(cos):
            if j == y:
                logits.append(s * target)
            else:
                logits.append(s * (c * (t + c) if c > target_m else c))
        top = max(logits)
        total += -(logits[y] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / len(labels)


def test_curricularface_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    labels = rng.integers(0, 5, 12)
    loss = CurricularFaceLoss(5, 8, margin=0.4, scale=30.0)
    w = loss.W.detach().numpy().astype(np.float64)
    loss.t.fill_(0.3)  # a curriculum past its start: hard negatives are re-weighted
    loss.eval()  # t stays as set
    with torch.no_grad():
        got = float(loss(torch.from_numpy(x), torch.from_numpy(labels)))
    assert got == pytest.approx(curricular_by_hand(x, w, labels, 0.4, 30.0, 0.3), rel=1e-4)
    loss.train()
    loss(torch.from_numpy(x), torch.from_numpy(labels))
    cos_y = torch.nn.functional.normalize(
        torch.from_numpy(x), dim=1
    ) @ torch.nn.functional.normalize(loss.W.detach(), dim=0)
    mean = float(cos_y[torch.arange(12), torch.from_numpy(labels)].mean())
    assert float(loss.t) == pytest.approx(0.99 * 0.3 + 0.01 * mean, abs=1e-6)


def test_dynamic_margins_follow_the_class_counts() -> None:
    m = dynamic_margins([1, 16, 81, 10_000], low=0.05, high=0.5)
    assert m[0] == pytest.approx(0.5) and m[-1] == pytest.approx(0.05)
    v = np.array([1, 16, 81, 10_000], float) ** -0.25  # m = a n^(-1/4) + b
    a = (0.5 - 0.05) / (v.max() - v.min())
    np.testing.assert_allclose(m, a * v + (0.05 - a * v.min()), rtol=1e-6)
    assert (np.diff(m) < 0).all()  # rarer classes, larger margins
    np.testing.assert_array_equal(dynamic_margins([7, 7, 7]), np.full(3, 0.5, np.float32))
    for bad in ([0, 3], []):
        with pytest.raises(ConfigError, match="at least 1"):
            dynamic_margins(bad)


def test_the_dynamic_margin_is_arcface_with_each_class_margin() -> None:
    """Every class at one margin: exactly PML's sub-center ArcFace."""
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    torch.manual_seed(0)
    x, labels = torch.randn(10, 6), torch.randint(0, 4, (10,))
    dynamic = DynamicSubCenterArcFaceLoss(
        np.full(4, np.radians(20.0), np.float32), num_classes=4, embedding_size=6, scale=30.0
    )
    plain = SubCenterArcFaceLoss(num_classes=4, embedding_size=6, margin=20.0, scale=30.0)
    plain.W.data.copy_(dynamic.W.data)
    with torch.no_grad():
        assert float(dynamic(x, labels)) == pytest.approx(float(plain(x, labels)), rel=1e-5)
        dynamic.margins[labels[0]] += 0.3  # one class's larger margin: a larger loss
        assert float(dynamic(x, labels)) > float(plain(x, labels))


def synthetic(n_classes: int = 6, per_class: int = 8, dim: int = 16, seed: int = 0):
    """Noisy copies of one random centre per class: ``(features, labels)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + 0.9 * rng.standard_normal((len(labels), dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


@pytest.mark.parametrize("name", list(LOSS_PRESETS))
def test_every_preset_reduces_its_loss(name: str) -> None:
    torch.manual_seed(0)
    x, labels = synthetic()
    counts = np.bincount(labels.numpy()).tolist()
    counts[0] = 2  # unequal counts for the dynamic margins
    loss, miner = build_loss(loss_preset(name), 6, 8, counts)
    model = torch.nn.Linear(16, 8)
    groups = [{"params": model.parameters(), "lr": 0.05}]
    if LOSS_PRESETS[name].kind == CLASSIFIER:
        groups.append({"params": loss.parameters(), "lr": 0.5})  # the head's own rate
    else:
        assert not list(loss.parameters())
    optimiser = torch.optim.SGD(groups, momentum=0.9)

    def value() -> torch.Tensor:
        emb = torch.nn.functional.normalize(model(x), dim=1)
        if miner is None:
            return loss(emb, labels)
        return loss(emb, labels, miner(emb, labels))

    with torch.no_grad():
        loss.eval()
        before = float(value())
        loss.train()
    for _ in range(30):
        optimiser.zero_grad()
        value().backward()
        optimiser.step()
    with torch.no_grad():
        loss.eval()
        after = float(value())
    assert after < 0.8 * before, (before, after)


def test_contrastive_pulls_positives_and_pushes_near_negatives() -> None:
    """PML measures the contrastive margins as Euclidean distances: a positive pair at cosine
    0.6 (distance 0.89) is pulled together, a negative pair at cosine 0.9 pushed apart."""
    loss, miner = build_loss(loss_preset("contrastive"), 2, 3)
    for pair, label, closer in (
        ([[1, 0, 0], [0.6, 0.8, 0]], [0, 0], True),
        ([[1, 0, 0], [0.9, 0.43589, 0]], [0, 1], False),
    ):
        far = torch.tensor([[0.0, 0, 1], [0, 0, -1]])  # two more classes, out of reach
        emb = torch.tensor(pair, requires_grad=True)
        labels = torch.tensor([*label, 2, 3])

        def cosine(e: torch.Tensor) -> float:
            e = torch.nn.functional.normalize(e, dim=1)
            return float(e[0] @ e[1])

        x = torch.nn.functional.normalize(torch.cat([emb, far]), dim=1)
        value = loss(x, labels, miner(x, labels))
        assert float(value) > 0.05
        value.backward()
        before = cosine(emb.detach())
        after = cosine(emb.detach() - 0.1 * emb.grad)
        assert (after > before) == closer, (before, after)


def test_unknown_presets_and_missing_counts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown loss preset 'nope'.*arcface"):
        loss_preset("nope")
    with pytest.raises(ConfigError, match="image count of every class"):
        build_loss(loss_preset("subcenter-dynamic"), 6, 8)


def test_pk_batches_hold_p_classes_of_k_images() -> None:
    labels = [0] * 10 + [1] * 10 + [2] * 2 + [3] * 7 + [4] * 1 + [5] * 6  # 2 and 4: fewer than k
    sampler = pk_sampler(labels, k=4, batch_size=12, seed=0)
    order = list(iter(sampler))
    assert len(order) == len(sampler) and len(order) % 12 == 0
    for begin in range(0, len(order), 12):
        counts = Counter(labels[i] for i in order[begin : begin + 12])
        assert len(counts) == 3 and set(counts.values()) == {4}
    drawn = {labels[i] for _ in range(10) for i in iter(sampler)}  # a few epochs
    assert drawn == set(range(6))  # rare classes too
    assert order == list(iter(pk_sampler(labels, k=4, batch_size=12, seed=0)))  # seeded
    with pytest.raises(ConfigError, match="multiple of k"):
        pk_sampler(labels, k=4, batch_size=10)
    with pytest.raises(ConfigError, match="at least as many classes"):
        pk_sampler([0, 0, 1, 1], k=2, batch_size=6)


@pytest.mark.parametrize("k", [None, 4])
def test_epoch_batches_split_across_processes(k) -> None:
    from lookalike.train.losses import epoch_batches

    labels = [c for c in range(8) for _ in range(9)]  # 72 images
    whole = epoch_batches(labels, 8, seed=3, epoch=2, k=k)
    assert whole == epoch_batches(labels, 8, seed=3, epoch=2, k=k)  # from the seed alone
    assert whole != epoch_batches(labels, 8, seed=3, epoch=3, k=k)  # a new order each epoch
    assert all(len(b) == 8 for b in whole) and len(whole) == 9
    ranks = [epoch_batches(labels, 8, 3, 2, k, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # equal counts: no process waits for another
    assert ranks[0] + ranks[1] == whole[0:8:2] + whole[1:8:2]
    if k is not None:
        for batch in ranks[0] + ranks[1]:
            assert set(Counter(labels[i] for i in batch).values()) == {4}
    with pytest.raises(ConfigError, match="rank"):
        epoch_batches(labels, 8, 3, 2, k, rank=2, world=2)
