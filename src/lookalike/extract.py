"""Global descriptors: images -> ``(N, D)`` float32, L2-normalised.

The stage runs a backbone (:mod:`lookalike.models`) through a runner
(:mod:`lookalike.runtime`), pools the feature map (:mod:`lookalike.pooling`) at one or more
scales, sums the per-scale descriptors and L2-normalises. Whitening is learned later, from
the indexed collection, and applied by the index.

``EXTRACT_PRESETS`` holds the named settings; ``default`` was chosen by measurement
(``benchmarks/retrieval.py``, see docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lookalike import functional as F
from lookalike.errors import ConfigError, IndexStateError
from lookalike.images import Decoded, decode_many, read_image, resize_long_side
from lookalike.index.manifest import Manifest, QueryDefaults, check_crops
from lookalike.models import create_backbone
from lookalike.pooling import create_pooling
from lookalike.runtime import create_runner
from lookalike.whitening import WhiteningConf

logger = logging.getLogger(__name__)

TRAINED = "trained"  # the pooling of a trained model: its own head (lookalike.train)


@dataclass(frozen=True)
class ExtractConf:
    """How global descriptors are computed. Frozen: a misspelled field is an error."""

    model: str = "efficientnet_lite0"  # MODELS key or any timm name
    weights: str | None = None  # local checkpoint path; None: packaged / hub weights
    image_size: int = 512  # long side of the image at scale 1, pixels
    upscale: bool = False  # enlarge images smaller than image_size; False only shrinks
    scales: tuple[float, ...] = (1.0,)  # image scales whose descriptors are summed; (1.0,) is off
    pooling: str = "rmac"  # POOLING key: gap, spoc, mac, gem, rmac; or "trained": the head
    #   of the trained model whose directory ``weights`` names (lookalike.train.model_dir)
    gem_p: float = 3.0  # GeM exponent (pooling="gem" only)
    rmac_levels: int = 3  # R-MAC region scales (pooling="rmac" only)
    whitening: WhiteningConf | None = field(
        default_factory=lambda: WhiteningConf(dim=256, shrinkage=0.3, power=0.2)
    )  # learned from the collection's regional descriptors; None switches it off
    query_rotations: tuple[int, ...] = (0, 90, 270)  # query angles (deg) searched; (0,) is off
    rotation_penalty: float = 0.05  # subtracted from scores of rotated query views; 0 is off
    query_crops: tuple[float, ...] = ()  # regional query views: for each size (a fraction of
    #   the query's sides) a grid of overlapping crops, each searched (query_crop_boxes); () off
    crop_penalty: float = QueryDefaults.crop_penalty  # subtracted from crop views' scores
    runtime: str = "auto"  # auto (ONNX on CPU, torch on CUDA), onnx, torch
    device: str = "auto"  # auto, cpu, cuda
    batch_size: int = 8  # images per forward pass (same-size images are batched together)
    workers: int = 1  # decoding processes; 0 decodes in the calling process

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32 px, got {self.image_size}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be positive, got {self.scales}")
        if any(r % 90 for r in self.query_rotations) or not self.query_rotations:
            raise ConfigError(
                f"query_rotations must be multiples of 90, got {self.query_rotations}"
            )
        try:
            check_crops(self.query_crops, "query_crops")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("batch_size must be >= 1 and workers >= 0")
        if self.pooling == TRAINED and self.weights is None:
            raise ConfigError("pooling 'trained' needs weights: the trained model's directory")

    def descriptor(self) -> dict:
        """The fields that define the descriptor space (stored in an index, checked on reuse)."""
        d = dataclasses.asdict(self)
        query_only = ("query_rotations", "rotation_penalty", "query_crops", "crop_penalty")
        for key in (*query_only, "runtime", "device", "batch_size", "workers"):
            d.pop(key)
        d["scales"] = list(self.scales)
        return d

    def query_defaults(self) -> QueryDefaults:
        """The query-time fields an index records as its search defaults."""
        return QueryDefaults(
            tuple(self.query_rotations),
            float(self.rotation_penalty),
            tuple(self.query_crops),
            float(self.crop_penalty),
        )

    @classmethod
    def from_descriptor(cls, descriptor: dict, **overrides: object) -> ExtractConf:
        """The settings recorded as :meth:`descriptor`, plus run-time ``overrides``.

        Raises:
            IndexStateError: the descriptor names settings this version does not know.
        """
        d = dict(descriptor)
        try:
            if d.get("whitening") is not None:
                d["whitening"] = WhiteningConf(**d["whitening"])
            d["scales"] = tuple(d.get("scales", (1.0,)))
            conf = cls(**d)
        except (TypeError, ValueError) as error:
            raise IndexStateError(
                f"the index's descriptor settings are not understood ({error}); upgrade "
                "lookalike or rebuild the index"
            ) from None
        return conf.replace(**overrides) if overrides else conf

    @classmethod
    def for_index(cls, manifest: Manifest, **overrides: object) -> ExtractConf:
        """What describes queries of an index: its descriptor and its query defaults."""
        conf = cls.from_descriptor(manifest.descriptor).with_query(manifest.query)
        return conf.replace(**overrides) if overrides else conf

    def with_query(self, query: QueryDefaults) -> ExtractConf:
        """A copy whose query-time fields are ``query`` (the inverse of
        :meth:`query_defaults`)."""
        return self.replace(
            query_rotations=tuple(query.rotations),
            rotation_penalty=query.rotation_penalty,
            query_crops=tuple(query.crops),
            crop_penalty=query.crop_penalty,
        )

    def replace(self, **changes: object) -> ExtractConf:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown extract settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


EXTRACT_PRESETS: dict[str, ExtractConf] = {
    "default": ExtractConf(),
    # Upright queries only: 3x cheaper queries; -3 mAP on Holidays (rotated photos).
    "upright": ExtractConf(query_rotations=(0,)),
    "fast": ExtractConf(image_size=384, pooling="gem", whitening=None, query_rotations=(0,)),
    "lite2": ExtractConf(model="efficientnet_lite2"),
    "multiscale": ExtractConf(scales=(0.75, 1.0, 1.25)),
    # The naive baseline the benchmarks compare against: one scale, average pooling.
    "naive": ExtractConf(image_size=400, pooling="gap", whitening=None, query_rotations=(0,)),
}


def get_preset(name: str) -> ExtractConf:
    if name not in EXTRACT_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(EXTRACT_PRESETS)}")
    return EXTRACT_PRESETS[name]


@dataclass
class Descriptors:
    """Output of :meth:`Extractor.extract_arrays`.

    Attributes:
        global_: ``(N, D)`` float32, L2-normalised.
        regions: per image ``(R, D)`` float16 L2-normalised region descriptors (scale 1),
            what whitening is learned from; None when not requested.
    """

    global_: np.ndarray
    regions: list[np.ndarray] | None = None


class TrainedHead(torch.nn.Module):
    """A trained model's head (pooling with its learned p, projection, batch norm) as a
    pooling layer: what follows the exported backbone when indexing with a trained model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.dim = int(model.dim)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[:, None]


def _trained_parts(conf: ExtractConf) -> tuple[torch.nn.Module, TrainedHead]:
    from lookalike.train.model_dir import load_model

    loaded = load_model(conf.weights)
    if loaded.info["backbone"]["name"] != conf.model:
        raise ConfigError(
            f"model {conf.weights} is a {loaded.info['backbone']['name']}, not {conf.model}"
        )
    return loaded.model.backbone, TrainedHead(loaded.model)


class Extractor:
    """Computes global descriptors with a fixed :class:`ExtractConf`."""

    def __init__(self, conf: ExtractConf = ExtractConf(), cache_dir: Path | None = None) -> None:
        self.conf = conf
        if conf.pooling == TRAINED:
            self.backbone, self.pooling = _trained_parts(conf)
        else:
            self.backbone = create_backbone(conf.model, conf.weights)
            self.pooling = create_pooling(conf.pooling, conf.gem_p, conf.rmac_levels)
        self.runner = create_runner(self.backbone, conf.runtime, conf.device, cache_dir)
        self.mean = np.asarray(self.backbone.mean, np.float32)[:, None, None]
        self.std = np.asarray(self.backbone.std, np.float32)[:, None, None]

    @property
    def dim(self) -> int:
        return getattr(self.pooling, "dim", None) or self.backbone.out_channels

    @property
    def max_side(self) -> int:
        """Long side images are decoded at (the largest scale)."""
        return round(self.conf.image_size * max(self.conf.scales))

    def _normalise(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return (x - self.mean) / self.std

    def _describe(
        self, batch: np.ndarray, want_regions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 3, H, W)`` at the largest scale -> ``(B, D)`` and regions ``(B, R, D)``."""
        top = max(self.conf.scales)
        x = torch.from_numpy(batch)
        total, regions = None, None
        for scale in self.conf.scales:
            feats = self.runner(F.resize_map(x, scale / top).numpy())
            d = F.l2n(self.pooling(feats))
            total = d if total is None else total + d
            if want_regions and (regions is None or scale == 1.0):
                regions = self.pooling.regions(feats)
        return F.l2n(total), regions

    def extract_arrays(
        self, images: Sequence[np.ndarray], want_regions: bool = False
    ) -> Descriptors:
        """Describe decoded images.

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays, already resized to ``max_side``.
            want_regions: also return the regional descriptors for whitening.
        """
        n = len(images)
        out = np.zeros((n, self.dim), np.float32)
        regions: list[np.ndarray | None] = [None] * n
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ConfigError(f"expected (H, W, 3) uint8 images, got {img.shape} {img.dtype}")
            by_shape[img.shape].append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), self.conf.batch_size):
                chunk = idx[start : start + self.conf.batch_size]
                g, r = self._describe(self._normalise([images[i] for i in chunk]), want_regions)
                out[chunk] = g.numpy()
                if r is not None:
                    for j, i in enumerate(chunk):
                        regions[i] = r[j].numpy().astype(np.float16)
        return Descriptors(out, regions if want_regions else None)  # type: ignore[arg-type]

    def extract_files(
        self, paths: Sequence[str | Path], want_regions: bool = False, chunk: int = 32
    ) -> Iterator[tuple[list[Decoded], Descriptors]]:
        """Decode files in worker processes and describe them, ``chunk`` files at a time.

        Yields ``(decoded, descriptors)`` per chunk, in input order; ``descriptors`` has one
        row per decoded file without error (in order). Bad files never raise.
        """
        pending: list[Decoded] = []
        stream = decode_many(
            paths, self.max_side, workers=self.conf.workers, upscale=self.conf.upscale
        )
        try:
            for item in stream:
                pending.append(item)
                if len(pending) >= chunk:
                    yield pending, self._describe_decoded(pending, want_regions)
                    pending = []
            if pending:
                yield pending, self._describe_decoded(pending, want_regions)
        finally:
            stream.close()

    def _describe_decoded(self, items: list[Decoded], want_regions: bool) -> Descriptors:
        good = [d.image for d in items if d.error is None]
        if not good:
            return Descriptors(np.zeros((0, self.dim), np.float32), [] if want_regions else None)
        return self.extract_arrays(good, want_regions)

    def extract_query(
        self,
        image: str | Path | bytes | Image.Image,
        box: tuple[float, float, float, float] | None = None,
        rotations: Sequence[int] | None = None,
        crops: Sequence[float] | None = None,
    ) -> np.ndarray:
        """Describe one query image (a path, bytes or a PIL image; optionally cropped):
        ``(len(rotations) + crop views, D)`` float32: one row per rotated view (default: the
        conf's ``query_rotations``), then one per regional crop of the sizes ``crops``
        (default none; upright; :func:`query_crop_boxes`), each cut from the image read at
        the resolution that describes it at ``image_size``."""
        rots = self.conf.query_rotations if rotations is None else tuple(rotations)
        sizes = tuple(crops or ())
        side, upscale = self.max_side, self.conf.upscale
        img = np.asarray(read_image(image, side, box=box, upscale=upscale))  # as indexed
        # np.rot90 turns counter-clockwise, like PIL's rotate
        views = [np.ascontiguousarray(np.rot90(img, k=(r // 90) % 4)) for r in rots]
        if sizes:
            # crops are cut from a larger reading of the photo, so that a crop is described
            # with as many pixels as the whole image is (an item in a third of the frame)
            full = read_image(image, round(side / min(sizes)), box=box, upscale=upscale)
            for x1, y1, x2, y2 in query_crop_boxes(full.width, full.height, sizes):
                crop = full.crop((x1, y1, x2, y2))
                views.append(np.asarray(resize_long_side(crop, side, upscale)))
        return self.extract_arrays(views).global_


def query_crop_boxes(
    width: int, height: int, sizes: Sequence[float]
) -> list[tuple[int, int, int, int]]:
    """The regional crops of a ``width`` x ``height`` query: for each size ``s`` (a
    fraction of both sides) an ``n`` x ``n`` grid of ``s``-sized boxes evenly spread from
    one edge to the other, ``n = round(1 / s) + 1`` (0.5: 3 x 3 boxes overlapping by
    half; 0.7: 2 x 2), as R-MAC spreads its regions. ``(x1, y1, x2, y2)`` pixel boxes."""
    boxes = []
    for s in sizes:
        w, h = max(1, round(width * s)), max(1, round(height * s))
        n = round(1 / s) + 1
        xs = np.linspace(0, width - w, n).round().astype(int)
        ys = np.linspace(0, height - h, n).round().astype(int)
        boxes.extend((int(x), int(y), int(x) + w, int(y) + h) for y in ys for x in xs)
    return boxes
