"""``Query``: what a search is asked with, and ``QueryContext``: what its stages see.

A query is exactly one of: an image (a file path, encoded bytes, or a PIL image), the id
of an indexed image, or a raw descriptor vector; an image query may carry a box (crop,
pixels of the upright full-size image). :meth:`Query.of` turns any of these values into a
query, so :meth:`lookalike.search.Searcher.search` takes them as they come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from lookalike.errors import ConfigError

Box = tuple[float, float, float, float]
ImageSource = Union[str, Path, bytes, Image.Image]  # noqa: UP007 - a runtime alias
QueryLike = Union["Query", ImageSource, int, np.integer, np.ndarray]


def check_box(box: object) -> Box | None:
    """``(x1, y1, x2, y2)`` as floats with x1 < x2 and y1 < y2; ``ConfigError`` otherwise."""
    if box is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"a box must be four numbers x1, y1, x2, y2, got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or not (x1 < x2 and y1 < y2):
        raise ConfigError(f"box {box!r} is empty or not finite: give x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def check_rotations(rotations: object) -> tuple[int, ...]:
    """Query angles as a non-empty tuple of ints, each a multiple of 90 degrees;
    ``ConfigError`` otherwise."""
    try:
        values = list(rotations)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(f"rotations must be a list of angles, got {rotations!r}") from None
    angles = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ConfigError(f"rotations must be angles in degrees, got {value!r}")
        if not math.isfinite(value) or value != int(value) or int(value) % 90:
            raise ConfigError(f"rotations must be multiples of 90 degrees, got {tuple(values)}")
        angles.append(int(value))
    if not angles:
        raise ConfigError("rotations must name at least one angle (0 is upright)")
    return tuple(angles)


@dataclass(frozen=True)
class Query:
    """One query; give exactly one of ``image``, ``id`` and ``vector``.

    Attributes:
        image: a file path, encoded bytes (an upload) or a PIL image.
        id: an indexed image, described by its stored vector (and local features).
        vector: a raw descriptor as the extractor makes them (the index whitens it):
            ``(D,)``, or ``(R, D)`` views of one query (rotations, upright first), searched
            like an image's views.
        box: crop of ``image``, pixels of the upright full-size image; None is the whole.
        rotations: for an image, the angles (degrees) to search instead of the index's
            defaults; for ``(R, D)`` views, the angle of each (their scores get the rotation
            penalty); None: the defaults (views: upright, then the defaults' other angles).
        features: the query's local features, precomputed (keypoints in pixels of the
            cropped image), for verification; None: detected when needed.
        name: how results name the query (default: the path, ``id:N``, ``<bytes>`` ...).
    """

    image: ImageSource | None = None
    id: int | None = None
    vector: np.ndarray | None = field(default=None, compare=False)
    box: Box | None = None
    rotations: tuple[int, ...] | None = None
    features: dict | None = field(default=None, compare=False)
    name: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("image", "id", "vector") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"a query is one image, id or vector, got {', '.join(given) or 'nothing'}"
            )
        if isinstance(self.id, np.integer):
            object.__setattr__(self, "id", int(self.id))
        if self.id is not None and (isinstance(self.id, bool) or not isinstance(self.id, int)):
            raise ConfigError(f"a query id must be an integer, got {self.id!r}")
        if self.rotations is not None:
            object.__setattr__(self, "rotations", check_rotations(self.rotations))
        if self.vector is not None:
            v = np.asarray(self.vector)
            if v.ndim not in (1, 2) or not np.issubdtype(v.dtype, np.floating) or not v.size:
                raise ConfigError(
                    f"a query vector must be a (D,) or (R, D) float array, got {v.shape} {v.dtype}"
                )
            if not np.isfinite(v).all():
                raise ConfigError("a query vector holds NaN or infinite values")
            views = 1 if v.ndim == 1 else len(v)
            if self.rotations is not None and len(self.rotations) != views:
                raise ConfigError(
                    f"a query of {views} vector view(s) needs one rotation per view, got "
                    f"{len(self.rotations)}: {self.rotations}"
                )
        if self.image is not None and not isinstance(
            self.image, str | Path | bytes | bytearray | Image.Image
        ):
            raise ConfigError(
                "a query image must be a file path, bytes or a PIL image, got "
                f"{type(self.image).__name__}"
            )
        if self.box is not None and self.image is None:
            raise ConfigError("a box crops an image query; ids and vectors take no box")
        object.__setattr__(self, "box", check_box(self.box))

    @classmethod
    def of(cls, value: QueryLike, box: Box | None = None) -> Query:
        """A query from a :class:`Query`, a path, bytes, a PIL image, an id or a vector."""
        if isinstance(value, Query):
            if box is not None:
                raise ConfigError("give the box inside the Query, not beside it")
            return value
        if isinstance(value, bool):
            raise ConfigError(f"{value!r} is not a query")
        if isinstance(value, int | np.integer):
            return cls(id=int(value), box=box)
        if isinstance(value, np.ndarray):
            return cls(vector=value, box=box)
        return cls(image=value, box=box)

    @property
    def label(self) -> str:
        """How output names the query: ``name``, the path, ``id:N``, ``<bytes>``, ..."""
        if self.name is not None:
            return self.name
        if isinstance(self.image, str | Path):
            return str(self.image)
        if self.image is not None:
            return "<bytes>" if isinstance(self.image, bytes | bytearray) else "<image>"
        return f"id:{self.id}" if self.id is not None else "<vector>"


@dataclass
class QueryContext:
    """What the re-ranking stages see of one query.

    Attributes:
        query: the query as asked.
        descriptor: ``(d,)`` float32 index-space descriptor of its upright view (the one
            query expansion expands).
        cache: values a stage computes once per query (e.g. its local features).
    """

    query: Query
    descriptor: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)
