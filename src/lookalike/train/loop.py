"""The training loop: :func:`train` fine-tunes a descriptor model on labelled images.

AdamW with the head (pooling, projection, the loss's class weights) on its own learning
rate, linear warm-up then cosine decay per group, gradient clipping, the first epochs with
the backbone frozen, float16 autocast on CUDA, progressive resizing (``sizes``), torchvision
v2 augmentations and a seed that makes runs repeatable. Images are decoded once (unreadable
ones are skipped with their reason, as indexing does) and kept in memory at the largest
training size.

State is written atomically: ``checkpoint.pt`` after every epoch and when interrupted
(Ctrl-C finishes the current step, saves, and raises :class:`TrainingInterrupted`);
``weights.pt`` and ``model.json`` whenever validation improves. ``resume=True`` continues
from ``checkpoint.pt``, mid-epoch included, and gives the same model as an uninterrupted run:
batch order and augmentations come from the seed, the epoch and the saved random state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lookalike.errors import ConfigError, LookalikeError
from lookalike.models import create_backbone, tensor_hash
from lookalike.runtime import resolve_device
from lookalike.train.conf import TrainConf
from lookalike.train.data import LabelledImages, labelled_images, split_validation
from lookalike.train.inputs import augmentation, decode_split, embed_images, fingerprint
from lookalike.train.model import DescriptorModel
from lookalike.train.model_dir import (
    CHECKPOINT,
    FORMAT,
    KIND,
    MODEL_JSON,
    WEIGHTS,
    describe_model,
    write_json,
    write_torch,
)

logger = logging.getLogger(__name__)


class TrainingInterrupted(LookalikeError):
    """Ctrl-C during training: the state was saved; ``--resume`` continues."""

    exit_code = 130


@dataclass(frozen=True)
class Progress:
    """What the loop reports after each step (the CLI draws it as a progress bar)."""

    epoch: int  # 0-based
    epochs: int
    step: int  # steps done in this epoch
    steps: int
    size: int  # crop size of this epoch
    loss: float  # running mean of this epoch
    lr: float  # the backbone's learning rate (the head's when frozen)
    images_per_s: float
    frozen: bool


def train(
    data: str | Path | LabelledImages,
    conf: TrainConf = TrainConf(),
    out_dir: str | Path = "model",
    *,
    val: str | Path | LabelledImages | None = None,
    labels: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> Path:
    """Fine-tune a descriptor model on labelled images; returns the model directory.

    Args:
        data: a folder (label = an image's parent folder name, or ``labels``) or
            :class:`~lookalike.train.data.LabelledImages`.
        conf: the run's settings.
        out_dir: the model directory to write (created).
        val: a validation folder (same layout) or images; None holds out
            ``conf.val_fraction`` of each class of ``data``.
        labels: a ``path,label`` CSV for ``data`` (and ``val`` when it is a folder).
        resume: continue the run whose ``checkpoint.pt`` is in ``out_dir``.
        progress: called after every step.

    Raises:
        ConfigError: bad data or settings, or a checkpoint of another run;
        TrainingInterrupted: Ctrl-C (the state is saved first).
    """
    out = Path(out_dir).expanduser()
    if resume and not (out / CHECKPOINT).is_file():
        raise ConfigError(f"nothing to resume: {out / CHECKPOINT} does not exist")
    if not resume and (out / CHECKPOINT).exists():
        raise ConfigError(
            f"{out} already holds a training run: pass --resume to continue it, or choose "
            "another --out"
        )
    train_set, val_set = training_splits(data, val, labels, conf)
    device = torch.device(resolve_device(conf.device))
    run = _Run(conf, out, device, progress)
    run.prepare(train_set, val_set)
    if resume:
        run.load_checkpoint()
    return run.fit()


def training_splits(
    data: str | Path | LabelledImages,
    val: str | Path | LabelledImages | None,
    labels: str | Path | None,
    conf: TrainConf,
) -> tuple[LabelledImages, LabelledImages | None]:
    train_set = data if isinstance(data, LabelledImages) else labelled_images(data, labels)
    if val is None:
        return split_validation(train_set, conf.val_fraction, conf.seed)
    val_set = val if isinstance(val, LabelledImages) else labelled_images(val, labels)
    # the validation labels by the training classes; classes training never saw still count
    # for retrieval among validation images, so they are appended
    names = list(train_set.classes) + sorted(set(val_set.classes) - set(train_set.classes))
    index = {c: i for i, c in enumerate(names)}
    remapped = LabelledImages(
        val_set.paths, tuple(index[val_set.classes[t]] for t in val_set.targets), tuple(names)
    )
    return train_set, remapped


def _lr_factor(step: int, start: int, total: int, warmup: float) -> float:
    """Linear warm-up then cosine decay over ``[start, total)``; 0 before ``start``."""
    if step < start:
        return 0.0
    span = max(1, total - start)
    warm = max(1, round(warmup * span)) if warmup > 0 else 0
    t = step - start
    if t < warm:
        return (t + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warm) / max(1, span - warm))))


class _StopFlag:
    """Ctrl-C sets a flag the loop checks after every step (main thread only)."""

    def __init__(self) -> None:
        self.set = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.set:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.set = True
            logger.warning("stopping after this step (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class _Run:
    """One training run's state; :func:`train` is its only user."""

    def __init__(
        self, conf: TrainConf, out: Path, device: torch.device, progress: Callable | None
    ) -> None:
        self.conf = conf
        self.out = out
        self.device = device
        self.progress = progress
        self.stop = _StopFlag()
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.rng_state: torch.Tensor | None = None  # of a resumed, interrupted epoch
        self.running: tuple[float, int] | None = None  # (loss sum, steps) of this epoch
        self.weights_record: dict | None = None  # model.json's "weights", once written

    # -- setting up -------------------------------------------------------------------

    def prepare(self, train_set: LabelledImages, val_set: LabelledImages | None) -> None:
        from lookalike.train.losses import CLASSIFIER, build_loss, loss_preset

        conf = self.conf
        torch.manual_seed(conf.seed)
        largest = max(size for size, _ in conf.sizes)
        self.train_data = decode_split(train_set, round(largest * 1.25), conf.workers)
        self.val_data = (
            decode_split(val_set, conf.index_size, conf.workers) if val_set is not None else None
        )
        self.classes = train_set.classes  # what the head trains on
        self.val_classes = self.classes if val_set is None else val_set.classes  # may add some
        present = sorted(set(self.train_data.targets))
        if len(present) < 2:
            raise ConfigError("fewer than two classes have readable training images")
        self.counts = [0] * len(self.classes)
        for t in self.train_data.targets:
            self.counts[t] += 1
        backbone = create_backbone(conf.model, conf.weights)
        # the weights training starts from (what a resumed run rebuilds the same way): the
        # other end of the weight-space ensemble (conf.wise)
        self.initial = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        self.initial_hash = backbone.weights_id
        model = DescriptorModel(backbone, conf.pooling, conf.dim, conf.gem_p)
        self.early = model.early_stages(conf.frozen_stages)
        # channels-last: oneDNN (CPU) and cuDNN run these convolutions about twice as fast
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.loss_conf = loss_preset(conf.loss)
        self.classifier = self.loss_conf.kind == CLASSIFIER
        counts = [max(c, 1) for c in self.counts]
        loss, self.miner = build_loss(self.loss_conf, len(self.classes), self.model.dim, counts)
        self.loss = loss.to(self.device)
        head = [*self.model.head_parameters(), *self.loss.parameters()]
        fixed = {id(p) for m in self.early for p in m.parameters()}
        trained = [p for p in self.model.backbone.parameters() if id(p) not in fixed]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": trained, "lr": conf.lr},
                {"params": head, "lr": conf.head_lr},
            ],
            weight_decay=conf.weight_decay,
        )
        n = len(self.train_data.images)
        if n < conf.batch_size:
            raise ConfigError(
                f"{n} readable training images are fewer than one batch ({conf.batch_size}); "
                "lower --batch-size"
            )
        self.steps_per_epoch = n // conf.batch_size
        total = self.steps_per_epoch * conf.epochs
        unfrozen = self.steps_per_epoch * conf.freeze_epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [
                lambda s: _lr_factor(s, unfrozen, total, conf.warmup),
                lambda s: _lr_factor(s, 0, total, conf.warmup),
            ],
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._amp)
        self.fingerprint = {
            "train": fingerprint(self.train_data, self.classes),
            "val": None if self.val_data is None else fingerprint(self.val_data, self.val_classes),
        }

    @property
    def _amp(self) -> bool:
        return self.conf.amp and self.device.type == "cuda"

    # -- checkpoints ------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "format": FORMAT,
            "settings": self.conf.to_dict(),
            "fingerprint": self.fingerprint,
            "initial_weights": self.initial_hash,
            "epoch": self.epoch,
            "step": self.step_in_epoch,
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": self.history,
            "best": self.best,
            "running": self.running,
        }

    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_torch(self.out / CHECKPOINT, self._state())

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"nothing to resume: {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises many types for a bad file
            raise ConfigError(
                f"cannot read {path}: {error}; start again without --resume"
            ) from None
        if "wise" not in state.get("settings", {}):
            raise ConfigError(
                f"{path} was written by an older lookalike (before weight-space ensembling): "
                "start a new run in another --out"
            )
        if state.get("settings") != self.conf.to_dict():
            raise ConfigError(
                f"{path} was written with other training settings; resume with the same ones "
                "or start a new run in another --out"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{path} was trained on other images; resume on the same data or start a new "
                "run in another --out"
            )
        if state.get("initial_weights") != self.initial_hash:
            raise ConfigError(
                f"{path} started from other backbone weights ({state.get('initial_weights')}, "
                f"now {self.initial_hash}): resume with the same --weights or start a new run"
            )
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step"])
        self.history, self.best = list(state["history"]), state["best"]
        self.rng_state = state["rng"]
        self.running = tuple(state["running"]) if state.get("running") else None
        logger.info("resuming at epoch %d, step %d", self.epoch + 1, self.step_in_epoch)

    def _info(self, interrupted: bool) -> dict:
        import lookalike

        versions = {"lookalike": lookalike.__version__, "torch": torch.__version__}
        for name in ("timm", "torchvision", "pytorch_metric_learning"):
            with contextlib.suppress(ImportError):
                versions[name] = __import__(name).__version__
        sizes = [size for size, _ in self.conf.sizes]
        return {
            "kind": KIND,
            "format": FORMAT,
            **describe_model(self.model),
            "input_size": {"train": sizes, "index": self.conf.index_size},
            "classes": list(self.classes),
            "class_counts": self.counts,
            "settings": self.conf.to_dict(),
            "data": {
                "fingerprint": self.fingerprint,
                "train_images": len(self.train_data.images),
                "val_images": 0 if self.val_data is None else len(self.val_data.images),
                "skipped": self.train_data.skipped
                + ([] if self.val_data is None else self.val_data.skipped),
            },
            "wise": {"alpha": self.conf.wise, "initial_weights": self.initial_hash},
            "epochs": self.history,
            "best_epoch": None if self.best is None else self.best["epoch"],
            "complete": not interrupted and self.epoch >= self.conf.epochs,
            "versions": versions,
        }

    def ensembled_state(self) -> dict[str, torch.Tensor]:
        """The model's state as it is saved: :func:`weight_space_ensemble` with the
        starting weights at ``conf.wise``."""
        return weight_space_ensemble(self.model.state_dict(), self.initial, self.conf.wise)

    @contextlib.contextmanager
    def ensembled(self) -> Iterator[None]:
        """The model holds :meth:`ensembled_state` inside the block, its training weights
        again after it."""
        if self.conf.wise == 1.0:
            yield
            return
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ensembled_state())
        try:
            yield
        finally:
            self.model.load_state_dict(trained)

    def save_model(self, interrupted: bool = False) -> None:
        """``weights.pt`` (the current model, ensembled as ``conf.wise`` says) and
        ``model.json``."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.ensembled_state()
        info = self._info(interrupted)
        info["weights"] = self.weights_record = {"file": WEIGHTS, "hash": tensor_hash(state)}
        write_torch(self.out / WEIGHTS, state)
        write_json(self.out / MODEL_JSON, info)

    def _update_json(self, interrupted: bool = False) -> None:
        """``model.json`` with the latest history, keeping the weights' record."""
        from lookalike.train.model_dir import read_info

        info = self._info(interrupted)
        info["weights"] = self.weights_record or read_info(self.out)["weights"]  # resumed
        write_json(self.out / MODEL_JSON, info)

    # -- the loop ---------------------------------------------------------------------

    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches: a shuffle (classifier losses) or P-K batches (pair losses),
        both from the seed and the epoch alone."""
        from lookalike.train.losses import epoch_batches

        conf = self.conf
        k = None if self.classifier else conf.k_per_class
        batches = epoch_batches(self.train_data.targets, conf.batch_size, conf.seed, epoch, k)
        return batches[: self.steps_per_epoch]

    def _set_frozen(self, frozen: bool) -> None:
        self.model.train()
        for p in self.model.backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.model.backbone.eval()  # batch-norm statistics stay ImageNet's
        for module in self.early:  # frozen throughout, statistics included
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def _step(self, images: torch.Tensor, targets: torch.Tensor, frozen: bool) -> float:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self._amp):
            if frozen:
                with torch.no_grad():
                    features = self.model.backbone(images)
                embeddings = self.model.embed(features.float())
            else:
                embeddings = self.model(images)
        embeddings = embeddings.float()
        if self.miner is not None:
            loss = self.loss(embeddings, targets, self.miner(embeddings, targets))
        else:
            loss = self.loss(embeddings, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.conf.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.conf.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def fit(self) -> Path:
        conf = self.conf
        self.out.mkdir(parents=True, exist_ok=True)
        if self.epoch == 0 and self.step_in_epoch == 0:
            self.save_checkpoint()  # a run always has a checkpoint to resume from
        with self.stop.installed():
            while self.epoch < conf.epochs:
                self._epoch()
                if self.stop.set:
                    break
        if self.stop.set:
            self.save_checkpoint()
            if (self.out / WEIGHTS).exists():
                self._update_json(interrupted=True)
            else:
                self.save_model(interrupted=True)
            raise TrainingInterrupted(
                f"training stopped at epoch {self.epoch + 1}, step {self.step_in_epoch}; saved "
                f"to {self.out}: --resume continues it"
            )
        self._update_json()
        return self.out

    def _epoch(self) -> None:
        conf, epoch = self.conf, self.epoch
        size = conf.size_of_epoch(epoch)
        frozen = epoch < conf.freeze_epochs
        self._set_frozen(frozen)
        transform = augmentation(
            size, self.model.backbone.mean, self.model.backbone.std, conf.augment
        )
        batches = self._batches(epoch)
        if self.step_in_epoch and self.rng_state is not None:
            torch.set_rng_state(self.rng_state)  # resumed mid-epoch: augmentations continue
        else:
            torch.manual_seed(conf.seed * 7_919 + epoch)
        self.rng_state = None
        total_loss, seen = self.running if self.step_in_epoch and self.running else (0.0, 0)
        started, done_images = time.perf_counter(), 0
        for step in range(self.step_in_epoch, len(batches)):
            rows = batches[step]
            x = torch.stack(
                [
                    transform(torch.from_numpy(self.train_data.images[r]).permute(2, 0, 1))
                    for r in rows
                ]
            ).to(self.device, non_blocking=True, memory_format=torch.channels_last)
            y = torch.tensor([self.train_data.targets[r] for r in rows], device=self.device)
            value = self._step(x, y, frozen)
            if not math.isfinite(value):
                raise ConfigError(
                    f"the loss became {value} at epoch {epoch + 1}, step {step + 1}: lower --lr"
                )
            total_loss, seen = total_loss + value, seen + 1
            self.step_in_epoch, self.running = step + 1, (total_loss, seen)
            done_images += len(rows)
            rate = done_images / max(1e-9, time.perf_counter() - started)
            if self.progress is not None:
                group = 1 if frozen else 0
                self.progress(
                    Progress(
                        epoch,
                        conf.epochs,
                        step + 1,
                        len(batches),
                        size,
                        total_loss / seen,
                        self.optimizer.param_groups[group]["lr"],
                        rate,
                        frozen,
                    )
                )
            if self.stop.set:
                return
        seconds = time.perf_counter() - started
        record = {
            "epoch": epoch + 1,
            "size": size,
            "frozen": frozen,
            "loss": round(total_loss / max(1, seen), 5),
            "seconds": round(seconds, 1),
            "images_per_s": round(done_images / max(1e-9, seconds), 2),
            "val": self.validate(),
        }
        self.history.append(record)
        self.epoch, self.step_in_epoch, self.running = epoch + 1, 0, None
        logger.info("epoch %d/%d: %s", epoch + 1, conf.epochs, record)
        score = _score(record["val"])
        if self.best is None or score >= self.best["score"]:
            self.best = {"epoch": epoch + 1, "score": score}
            self.save_model()
        else:
            self._update_json()
        self.save_checkpoint()

    # -- validation -------------------------------------------------------------------

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """Descriptors of whole images (as indexing describes them), in eval mode."""
        return embed_images(self.model, images, self.device, batch_size)

    def validate(self) -> dict | None:
        """Retrieval among the validation images (each against the others): Recall@1 and
        @5, mAP@R, R-precision, NMI and the worst classes; None without validation images
        of a class with two or more."""
        from lookalike.evaluate.labelled import labelled_metrics

        data = self.val_data
        if data is None or len(data.images) < 2:
            return None
        if max(np.bincount(data.targets)) < 2:
            return None
        with self.ensembled():  # what will be saved is what is validated
            x = self.embed(data.images)
        labels = [self.val_classes[t] for t in data.targets]
        report = labelled_metrics(x, labels, (1, 5), worst=5, seed=self.conf.seed)
        return {
            "recall_at_1": round(report.recall_at[1], 4),
            "recall_at_5": round(report.recall_at[5], 4),
            "map_at_r": round(report.map_at_r, 4),
            "r_precision": round(report.r_precision, 4),
            "nmi": None if report.nmi is None else round(report.nmi, 4),
            "worst": [vars(c) for c in report.worst],
        }


def weight_space_ensemble(
    state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """A descriptor model's ``state`` (on the CPU) with its backbone mixed with the weights
    training started from (``initial``, the backbone's state dict):
    ``(1 - alpha) * initial + alpha * fine-tuned`` (WiSE-FT, Wortsman et al. 2022; written
    here: timm and PML have no such step). The head has no starting point worth mixing (it
    began random) and is kept as trained."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if alpha == 1.0:
        return state
    for key, start in initial.items():
        name = f"backbone.{key}"
        if start.is_floating_point():  # not batch norm's step counters
            state[name] = torch.lerp(start, state[name].to(start.dtype), alpha)
    return state


def _score(val: dict | None) -> float:
    """What picks the best epoch: mAP@R then Recall@1 on validation; without validation
    the last epoch wins (every epoch scores the same)."""
    if val is None:
        return 0.0
    return val["map_at_r"] + 1e-3 * val["recall_at_1"]


__all__ = ["Progress", "TrainingInterrupted", "train", "training_splits", "weight_space_ensemble"]
