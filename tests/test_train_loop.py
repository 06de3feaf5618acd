"""The training loop and the model directory: a run writes a complete, loadable model
whose ONNX descriptors match PyTorch's; a resumed run equals an uninterrupted one; Ctrl-C
leaves a loadable checkpoint; settings are validated; indexing with the model records its
weights and refuses others."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, photo
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.train.conf import TrainConf, parse_sizes
from lookalike.train.inputs import embed_images
from lookalike.train.loop import TrainingInterrupted, train
from lookalike.train.model_dir import WEIGHTS, extract_conf, load_model, read_info

CLASSES = 4
PER_CLASS = 8


def write_labelled(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """``root/<group>/class<c>/<i>.png``: crops of one photo per class."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = photo(PHOTOS[c], 160)
        folder = root / ("even" if c % 2 == 0 else "odd") / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            x = int(rng.integers(0, base.width - 64 + 1))
            y = int(rng.integers(0, base.height - 64 + 1))
            crop = base.crop((x, y, x + 64, y + 64))
            crop.save(folder / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labelled(tmp_path_factory.mktemp("labelled") / "data")


TINY = TrainConf(
    sizes=((64, 2),),
    freeze_epochs=1,
    batch_size=8,
    index_size=64,
    val_fraction=0.25,
    workers=0,
    dim=32,
)


@pytest.fixture(scope="module")
def model_dir(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(labelled, TINY, tmp_path_factory.mktemp("model") / "m")


def test_a_run_writes_a_complete_model_directory(model_dir: Path) -> None:
    info = read_info(model_dir)
    assert info["backbone"]["name"] == "efficientnet_lite0"
    assert info["pooling"]["name"] == "gem" and info["pooling"]["p"] > 1
    assert info["projection"] == {"dim": 32, "batch_norm": True} and info["dim"] == 32
    assert info["input_size"] == {"train": [64], "index": 64}
    assert info["normalisation"]["mean"] and info["normalisation"]["std"]
    assert info["classes"] == [f"class{c}" for c in range(CLASSES)]
    assert sum(info["class_counts"]) == info["data"]["train_images"] == CLASSES * 6
    assert info["data"]["val_images"] == CLASSES * 2
    assert len(info["data"]["fingerprint"]["train"]) == 24
    assert TrainConf.from_dict(info["settings"]) == TINY
    assert [e["epoch"] for e in info["epochs"]] == [1, 2]
    assert info["epochs"][0]["frozen"] and not info["epochs"][1]["frozen"]
    assert all(0 <= e["val"]["map_at_r"] <= 1 for e in info["epochs"])
    assert info["best_epoch"] in (1, 2) and info["complete"] is True
    assert {"lookalike", "torch", "timm", "pytorch_metric_learning"} <= set(info["versions"])
    assert (model_dir / "checkpoint.pt").is_file()


def test_the_model_round_trips_and_onnx_matches_pytorch(model_dir: Path, lookalike_cache) -> None:
    from lookalike.extract import Extractor

    loaded = load_model(model_dir)
    again = load_model(model_dir)
    for (k, a), (_, b) in zip(
        loaded.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert loaded.weights_hash == read_info(model_dir)["weights"]["hash"]
    extractor = Extractor(extract_conf(model_dir, workers=0), cache_dir=lookalike_cache)
    assert extractor.dim == 32 and extractor.conf.whitening.dim == 32  # at most the model's
    assert extractor.backbone.weights_id == loaded.weights_hash
    images = [np.asarray(photo(name, 64)) for name in PHOTOS[:3]]
    onnx = extractor.extract_arrays(images).global_
    torch_ = embed_images(loaded.model, images, torch.device("cpu"))
    cosine = (onnx * torch_).sum(axis=1)
    assert cosine.min() > 0.999, cosine


def test_damaged_or_replaced_weights_are_refused(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    state = torch.load(copy / WEIGHTS, weights_only=True)
    state["head.0.bias"] = state["head.0.bias"] + 1
    torch.save(state, copy / WEIGHTS)
    with pytest.raises(ConfigError, match="damaged or replaced"):
        load_model(copy)
    (copy / "model.json").write_text("{}")
    with pytest.raises(ConfigError, match="does not describe a lookalike model"):
        load_model(copy)
    with pytest.raises(ConfigError, match="not a lookalike model directory"):
        load_model(tmp_path)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / WEIGHTS, weights_only=True)


def _interrupt_at(epoch: int, step: int):
    def progress(p) -> None:
        if (p.epoch, p.step) == (epoch, step):
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the loop finishes the step

    return progress


@pytest.mark.parametrize("epoch, step", [(0, 1), (1, 2)])
def test_ctrl_c_saves_and_a_resumed_run_equals_an_uninterrupted_one(
    labelled: Path, model_dir: Path, tmp_path: Path, epoch: int, step: int
) -> None:
    out = tmp_path / "m"
    with pytest.raises(TrainingInterrupted, match="--resume continues it"):
        train(labelled, TINY, out, progress=_interrupt_at(epoch, step))
    info = read_info(out)
    assert info["complete"] is False
    load_model(out)  # loadable as it is
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (epoch, step)
    with pytest.raises(ConfigError, match="--resume"):
        train(labelled, TINY, out)
    train(labelled, TINY, out, resume=True)
    want, got = _weights(model_dir), _weights(out)
    for key in want:
        assert torch.allclose(want[key], got[key], atol=1e-5), key
    assert read_info(out)["complete"] is True
    assert [e["loss"] for e in read_info(out)["epochs"]] == pytest.approx(
        [e["loss"] for e in read_info(model_dir)["epochs"]], abs=1e-4
    )


def test_resume_refuses_other_settings_and_other_data(labelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    with pytest.raises(TrainingInterrupted):
        train(labelled, TINY, out, progress=_interrupt_at(0, 1))
    with pytest.raises(ConfigError, match="other training settings"):
        train(labelled, TINY.replace(lr=1e-3), out, resume=True)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(next(labelled.rglob("class0")) / "new.png")
    try:
        with pytest.raises(ConfigError, match="other images"):
            train(labelled, TINY, out, resume=True)
    finally:
        (next(labelled.rglob("class0")) / "new.png").unlink()
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(labelled, TINY, tmp_path / "none", resume=True)


def test_unreadable_images_are_skipped_with_their_reason(tmp_path: Path) -> None:
    root = write_labelled(tmp_path / "data", classes=2, per_class=6)
    bad = root / "even" / "class0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    out = train(root, TINY.replace(batch_size=4, sizes=((64, 1),), freeze_epochs=0), tmp_path / "m")
    skipped = read_info(out)["data"]["skipped"]
    assert [Path(s["path"]).name for s in skipped] == ["broken.jpg"]
    assert skipped[0]["error"]


def test_the_saved_backbone_is_the_weight_space_ensemble(labelled: Path, tmp_path: Path) -> None:
    from lookalike.models import create_backbone

    one = TINY.replace(sizes=((64, 1),), freeze_epochs=0)
    tuned = _weights(train(labelled, one.replace(wise=1.0), tmp_path / "tuned"))
    mixed_dir = train(labelled, one.replace(wise=0.25), tmp_path / "mixed")
    mixed = _weights(mixed_dir)
    start = create_backbone(TINY.model).model.state_dict()
    moved = 0
    for key, value in start.items():
        name = f"backbone.model.{key}"
        if value.is_floating_point():
            want = 0.75 * value + 0.25 * tuned[name]
            assert torch.allclose(mixed[name], want, atol=1e-6), name
            moved += not torch.equal(tuned[name], value)
    assert moved > 10  # the fine-tuned end differs from the start: the mix is not trivial
    for key in tuned:  # the head began random: kept as trained
        if not key.startswith("backbone."):
            assert torch.equal(mixed[key], tuned[key]), key
    wise = read_info(mixed_dir)["wise"]
    assert wise["alpha"] == 0.25 and len(wise["initial_weights"]) == 16


def test_training_goes_on_from_the_fine_tuned_weights_not_the_ensemble(
    labelled: Path, tmp_path: Path
) -> None:
    two = TINY.replace(freeze_epochs=0)  # validation after epoch 1 mixes a moved backbone
    states = []
    for wise in (1.0, 0.25):
        out = train(labelled, two.replace(wise=wise), tmp_path / f"w{wise}")
        states.append(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    moved = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not moved, moved[:3]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"loss": "nope"}, "unknown loss preset"),
        ({"pooling": "mac"}, "unknown pooling"),
        ({"sizes": ((16, 1),)}, "sizes"),
        ({"freeze_epochs": 5}, "freeze_epochs"),
        ({"batch_size": 6, "k_per_class": 4}, "multiple of k_per_class"),
        ({"lr": 0.0}, "learning rates"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"wise": 0.0}, "wise"),
        ({"wise": 1.5}, "wise"),
    ],
)
def test_bad_settings_are_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**changes)
    with pytest.raises(ConfigError, match="unknown training settings"):
        TINY.replace(epochz=3)


def test_progressive_sizes() -> None:
    conf = TrainConf(sizes=parse_sizes("224:4, 320:2"))
    assert conf.sizes == ((224, 4), (320, 2)) and conf.epochs == 6
    assert [conf.size_of_epoch(e) for e in range(6)] == [224] * 4 + [320] * 2
    with pytest.raises(ConfigError, match="size:epochs"):
        parse_sizes("224x4")


def test_too_few_images_for_a_batch(tmp_path: Path) -> None:
    root = write_labelled(tmp_path / "data", classes=2, per_class=3)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(root, TINY.replace(batch_size=16), tmp_path / "m")


def test_an_index_built_with_the_model_refuses_other_weights(
    labelled: Path, model_dir: Path, tmp_path: Path
) -> None:
    from lookalike.indexing import index_folder, resolve_settings
    from lookalike.search import Searcher

    copy, folder = tmp_path / "model", tmp_path / "images"
    shutil.copytree(model_dir, copy)
    shutil.copytree(labelled, folder)
    settings = resolve_settings(None, model=str(copy), workers=0)
    assert settings.extract.pooling == "trained" and settings.extract.weights == str(copy)
    index = tmp_path / "idx"
    report = index_folder(folder, index, settings.extract)
    assert report.added == CLASSES * PER_CLASS
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["model"]["weights_hash"] == read_info(copy)["weights"]["hash"]
    with Searcher.open(index) as searcher:
        assert len(searcher.search([next(labelled.rglob("*.png"))], k=3).ids) == 1
    # the model directory trained again in place: other weights under the same path
    other = train(labelled, TINY.replace(seed=1), tmp_path / "other")
    for name in ("model.json", WEIGHTS):
        shutil.copy(other / name, copy / name)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "new.png")  # to describe
    with pytest.raises(Exception, match="not those index"):
        index_folder(folder, index, resolve_settings(None, model=str(copy), workers=0).extract)
    with Searcher.open(index) as searcher, pytest.raises(Exception, match="not those index"):
        searcher.search([next(labelled.rglob("*.png"))], k=3)


def test_a_trained_model_fixes_its_descriptor(model_dir: Path) -> None:
    from lookalike.indexing import resolve_settings

    with pytest.raises(ConfigError, match="drop --pooling"):
        resolve_settings(None, model=str(model_dir), pooling="gem")
    with pytest.raises(ConfigError, match="drop --preset"):
        resolve_settings(None, "fast", model=str(model_dir))
    assert resolve_settings(None, model=str(model_dir), image_size=96).extract.image_size == 96


def test_a_validation_folder_with_classes_training_never_saw(tmp_path: Path) -> None:
    data = write_labelled(tmp_path / "data", classes=3, per_class=8)
    val = write_labelled(tmp_path / "val", classes=4, per_class=3)  # class3: unseen
    out = train(data, TINY.replace(sizes=((64, 1),), freeze_epochs=0), tmp_path / "m", val=val)
    info = read_info(out)
    assert info["classes"] == ["class0", "class1", "class2"]  # what the head was trained on
    assert info["data"]["train_images"] == 24 and info["data"]["val_images"] == 12
    val_scores = info["epochs"][0]["val"]
    assert {"recall_at_1", "map_at_r", "r_precision", "nmi", "worst"} <= set(val_scores)
    assert val_scores["nmi"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_with_amp(labelled: Path, tmp_path: Path) -> None:
    out = train(labelled, TINY.replace(device="cuda", amp=True), tmp_path / "m")
    assert read_info(out)["complete"] and np.isfinite(read_info(out)["epochs"][-1]["loss"])
    load_model(out)
