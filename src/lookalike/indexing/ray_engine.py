"""The Ray extraction engine: files are decoded and described by Ray Data actors, the
index is still committed by the calling process, chunk by chunk.

``index_folder(..., engine="ray", ray=RayConf(...))`` (``lookalike index DIR --engine ray``)
turns the files to describe into a Ray Dataset of ``(index, path)`` rows and maps its batches
through :class:`DescribeActor`, which loads the :class:`~lookalike.extract.Extractor` once (the
ONNX runner on CPU actors, the CUDA model on actors given a GPU) and returns, per file, its
global descriptor, its :class:`~lookalike.images.Decoded` fields (no pixels) and its regional
descriptors when the whitening wants samples. :func:`describe_files` puts the rows back in
input order and yields them in the commit chunks of the local engine
(:meth:`Extractor.extract_files`), so the index stage commits them through the same code:
what a killed job committed is skipped by the rerun, the whitening is learned from the same
samples, and the index is the one the local engine builds.

Ray is optional (``pip install 'lookalike[ray]'``) and imported only when the engine runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from lookalike.errors import ConfigError, LookalikeError
from lookalike.extract import Descriptors, ExtractConf
from lookalike.images import Decoded

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")  # how index_folder decodes and describes files
INSTALL_HINT = "pip install 'lookalike[ray]'"

Batches = Iterator[tuple[list[Decoded], Descriptors]]  # what the index stage commits
Row = tuple[Decoded, np.ndarray, np.ndarray | None, str]  # decoded, global, regions, weights


@dataclass(frozen=True)
class RayConf:
    """Where and how the Ray engine describes files. Frozen: a misspelled field is an error."""

    address: str | None = None  # None: start a local Ray on this machine's CPUs (or join the
    #   one this process already started); "auto": the running cluster; or "ray://host:10001"
    actors: int | None = None  # describing actors; None: one per cpus_per_actor CPUs of the
    #   cluster, or one per GPU for GPU actors
    batch_size: int = 32  # files per Ray batch (one actor call)
    cpus_per_actor: float = 1.0  # CPUs each actor reserves; also its ONNX Runtime threads
    gpus_per_actor: float | None = None  # None: 1 when describing on CUDA (device "cuda", or
    #   "auto" with GPUs in the cluster), else 0; 0 keeps the actors on the CPU

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"the Ray engine needs at least 1 actor, got {self.actors}")
        if self.batch_size < 1:
            raise ConfigError(f"the Ray batch size must be >= 1, got {self.batch_size}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")


def check_engine(engine: str, ray: RayConf | None) -> RayConf | None:
    """The Ray settings of a run (None for the local engine), validated before the index is
    opened.

    Raises:
        ConfigError: an unknown engine, Ray settings given to the local engine, or the Ray
            engine without Ray installed.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "local":
        if ray is not None:
            raise ConfigError("Ray settings were given with engine 'local': use engine='ray'")
        return None
    if importlib.util.find_spec("ray") is None:  # not imported yet: that takes seconds
        raise ConfigError(f"the Ray engine needs Ray Data: {INSTALL_HINT}")
    return ray if ray is not None else RayConf()


def require_ray() -> ModuleType:
    """The ``ray`` module with Ray Data loaded.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
        import ray.data  # the part of Ray the engine uses
    except ImportError as error:
        raise ConfigError(
            f"the Ray engine needs Ray Data ({error.name} is missing): {INSTALL_HINT}"
        ) from None
    return ray


class DescribeActor:
    """Decodes and describes batches of files; one model per actor, loaded once.

    A batch is ``{"index": (B,) int64, "path": (B,) bytes}`` (file names as the file system
    spells them: Arrow strings are UTF-8, names need not be); the answer has per file
    ``index``, ``global`` (``(B, D)`` float32, zeros for a file that failed), ``payload``
    (the pickled ``(Decoded without pixels, (R, D) float16 regions or None)``) and
    ``weights`` (the backbone's weights id, checked against the index by the caller). An
    actor that cannot describe (a :class:`LookalikeError`: a missing model file, a device it
    does not have) answers every file with the pickled error, which the caller raises.
    """

    def __init__(self, conf: ExtractConf, want_regions: bool, threads: int | None) -> None:
        from lookalike.extract import Extractor
        from lookalike.runtime import OnnxRunner

        self.want_regions = want_regions
        self.error: LookalikeError | None = None
        try:
            self.extractor = Extractor(conf)
        except LookalikeError as error:
            # sent back by every call instead: Ray keeps only the text of an error raised
            # here, and the caller reports a project error in one line
            self.error = error
            return
        if threads is not None and isinstance(self.extractor.runner, OnnxRunner):
            # ONNX Runtime starts one thread per core of the machine; actors sharing it
            # would spin against each other, so each runs on the CPUs it reserved
            self.extractor.runner = OnnxRunner(self.extractor.backbone, threads=threads)
        self.weights = self.extractor.backbone.weights_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is None:
            try:
                return self._describe(batch)
            except LookalikeError as error:
                self.error = error
        n = len(batch["index"])
        return {
            "index": np.asarray(batch["index"], np.int64),
            "global": np.zeros((n, 1), np.float32),
            "payload": np.array([pickle.dumps(self.error)] * n, dtype=object),
            "weights": np.array([""] * n, dtype=object),
        }

    def _describe(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [os.fsdecode(p) for p in batch["path"]]
        global_ = np.zeros((len(paths), self.extractor.dim), np.float32)
        payload = []
        extracted = self.extractor.extract_files(paths, self.want_regions, chunk=len(paths))
        for decoded, desc in extracted:
            good = 0
            for d in decoded:
                regions = None
                if d.error is None:
                    global_[len(payload)] = desc.global_[good]
                    if desc.regions is not None:
                        regions = desc.regions[good]
                    good += 1
                row = dataclasses.replace(d, index=int(batch["index"][len(payload)]), image=None)
                payload.append(pickle.dumps((row, regions), protocol=pickle.HIGHEST_PROTOCOL))
        return {
            "index": np.asarray(batch["index"], np.int64),
            "global": global_,
            "payload": np.array(payload, dtype=object),
            "weights": np.array([self.weights] * len(paths), dtype=object),
        }


@contextlib.contextmanager
def ray_session(conf: RayConf) -> Iterator[ModuleType]:
    """Ray, connected for the duration: the session this process already has, else one
    started (or joined, ``address``) here and shut down on leaving."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    logger.info("starting Ray (address %s)", conf.address or "local")
    try:
        ray.init(address=conf.address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = conf.address or "a local Ray"
        raise LookalikeError(
            f"could not start or reach {where} ({error}); check --ray-address "
            "(auto: a cluster started with `ray start --head`)"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def placement(conf: ExtractConf, rc: RayConf, resources: dict[str, float]) -> dict:
    """Actors, their resources and their descriptor settings, from the cluster's
    ``resources`` (``ray.cluster_resources()``).

    Raises:
        ConfigError: the actors ask for more than the cluster has, or CUDA without GPUs.
    """
    cpus, gpus_total = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    gpus = rc.gpus_per_actor
    if gpus is None:
        wants_cuda = conf.device.startswith("cuda") or (conf.device == "auto" and gpus_total)
        gpus = 1.0 if wants_cuda else 0.0
    if gpus and gpus > gpus_total:
        raise ConfigError(
            f"the Ray actors need {gpus:g} GPU each but the cluster has {gpus_total:g}; "
            "use --device cpu"
        )
    if rc.cpus_per_actor > cpus:
        raise ConfigError(
            f"the Ray actors need {rc.cpus_per_actor:g} CPUs each but the cluster has {cpus:g}"
        )
    if rc.actors is not None:
        actors = rc.actors
    elif gpus:
        actors = max(1, int(gpus_total // gpus))
    else:
        actors = max(1, int(cpus // rc.cpus_per_actor))
    # each actor decodes with the settings' worker processes, as the local engine does: a
    # file that crashes its decoder is pinned and recorded as failed, not the actor's death
    actor_conf = conf.replace(device="cuda" if gpus else "cpu")
    threads = None if gpus else max(1, math.floor(rc.cpus_per_actor))
    return {
        "actors": actors,
        "num_cpus": rc.cpus_per_actor,
        "num_gpus": gpus,
        "conf": actor_conf,
        "threads": threads,
    }


def describe_files(
    conf: ExtractConf,
    parts: Sequence[Sequence[Path]],
    want_regions: bool,
    chunk: int,
    rc: RayConf,
    check_weights: Callable[[str], None],
) -> Batches:
    """Describe the files of ``parts`` on Ray; yields ``(decoded, descriptors)`` per chunk of
    ``chunk`` files of each part, in order, as :meth:`Extractor.extract_files` on each part
    would (``decoded`` without pixels). ``check_weights`` is called with each model's weights
    id before a chunk described by it is yielded."""
    files = [p for part in parts for p in part]
    if not files:
        return
    with ray_session(rc) as ray:
        ctx = ray.data.DataContext.get_current()
        shown = ctx.enable_progress_bars
        ctx.enable_progress_bars = False  # the caller shows its own (per committed chunk)
        try:
            where = placement(conf, rc, ray.cluster_resources())
            logger.info(
                "describing %d files on Ray: %d actors (%g CPU, %g GPU each), batches of %d",
                len(files), where["actors"], where["num_cpus"], where["num_gpus"],
                rc.batch_size,
            )  # fmt: skip
            items = [{"index": i, "path": os.fsencode(p)} for i, p in enumerate(files)]
            blocks = math.ceil(len(files) / rc.batch_size)  # one per batch
            dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                DescribeActor,
                batch_size=rc.batch_size,
                batch_format="numpy",
                fn_constructor_kwargs={
                    "conf": where["conf"],
                    "want_regions": want_regions,
                    "threads": where["threads"],
                },
                compute=ray.data.ActorPoolStrategy(size=min(where["actors"], blocks)),
                num_cpus=where["num_cpus"],
                num_gpus=where["num_gpus"] or None,
            )
            results = dataset.iter_batches(batch_size=None, batch_format="numpy")
            with contextlib.closing(_in_order(iter(results))) as rows:
                yield from _chunks(rows, parts, chunk, want_regions, check_weights)
        finally:
            ctx.enable_progress_bars = shown


def _chunks(
    rows: Iterator[Row],
    parts: Sequence[Sequence[Path]],
    chunk: int,
    want_regions: bool,
    check_weights: Callable[[str], None],
) -> Batches:
    """The rows in the commit chunks of each part, each model's weights checked first."""
    checked: set[str] = set()
    for part in parts:
        for start in range(0, len(part), chunk):
            taken = [next(rows, None) for _ in part[start : start + chunk]]
            if any(row is None for row in taken):
                raise LookalikeError("Ray returned fewer files than it was given")
            for weights in {row[3] for row in taken} - checked:
                check_weights(weights)
                checked.add(weights)
            yield _chunk(taken, want_regions)
    if next(rows, None) is not None:  # and lets the execution finish
        raise LookalikeError("Ray returned more files than it was given")


def _in_order(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[Row]:
    """The rows of the result batches by input index (Ray returns batches as they finish)."""
    pending: dict[int, Row] = {}
    wanted = 0
    with contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext():
        for batch in batches:
            for index, global_, payload, weights in zip(
                batch["index"], batch["global"], batch["payload"], batch["weights"], strict=True
            ):
                item = pickle.loads(payload)
                if isinstance(item, LookalikeError):  # what an actor could not do, for the CLI
                    raise item
                decoded, regions = item
                pending[int(index)] = (decoded, global_, regions, str(weights))
            while wanted in pending:
                yield pending.pop(wanted)
                wanted += 1
    if pending:
        raise LookalikeError(f"Ray returned files out of sequence (file {wanted} is missing)")


def _chunk(rows: list[Row], want_regions: bool) -> tuple[list[Decoded], Descriptors]:
    """One commit chunk in the shape :meth:`Extractor.extract_files` yields."""
    decoded = [row[0] for row in rows]
    good = [row for row in rows if row[0].error is None]
    dim = rows[0][1].shape[0]
    global_ = np.stack([row[1] for row in good]) if good else np.zeros((0, dim), np.float32)
    regions = [row[2] for row in good] if want_regions else None
    return decoded, Descriptors(np.ascontiguousarray(global_, np.float32), regions)


__all__ = ["ENGINES", "DescribeActor", "RayConf", "check_engine", "describe_files"]
