"""Catalogue-style queries rendered from clean images: the item pasted into another photo.

The catalogue case (a shop's product shots, covers, paintings) is queried with phone
photos in which the item fills 25-70 % of a cluttered frame, tilted, rotated, blurred,
with glare. :func:`render_query` makes such a photo from a clean item image and a
background photo, with a random but seeded perspective (a 3-D tilt of the item's plane,
then an in-plane rotation), and records how hard it is (the area the item covers, the
tilt), so that a benchmark can report by difficulty (``benchmarks/catalogue.py``).

Written here: OpenCV warps and blurs, but no library renders planar items into scenes with
a known homography for retrieval benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from lookalike.errors import ConfigError


@dataclass(frozen=True)
class RenderConf:
    """The ranges a rendered query's nuisances are drawn from (uniformly)."""

    frame: tuple[int, int] = (640, 480)  # (long, short) side of the photo; portrait or landscape
    area: tuple[float, float] = (0.25, 0.7)  # fraction of the frame the item covers
    tilt: float = 40.0  # the item plane's largest tilt from facing the camera, degrees
    rotation: float = 30.0  # largest in-plane rotation, degrees (either way)
    blur: float = 1.5  # largest Gaussian blur sigma, pixels
    glare: float = 0.5  # chance of a glare spot on the item
    jpeg: tuple[int, int] = (50, 90)  # JPEG quality range of the saved photo
    colour: float = 0.15  # largest per-channel gain change (white balance), either way

    def __post_init__(self) -> None:
        lo, hi = self.area
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"area must be 0 < low <= high < 1, got {self.area}")
        if not 0 <= self.tilt < 80 or self.rotation < 0 or self.blur < 0:
            raise ConfigError("tilt must be in [0, 80) degrees; rotation and blur >= 0")


@dataclass(frozen=True)
class Rendered:
    """What was done to the item: the homography from item pixels to photo pixels and the
    drawn nuisances."""

    homography: np.ndarray  # (3, 3) float64
    area: float  # fraction of the frame the item covers
    tilt: float  # degrees
    rotation: float  # degrees
    blur: float
    glare: bool
    jpeg: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["homography"] = np.asarray(self.homography).round(6).tolist()
        return d


def _quad(width: int, height: int, tilt: float, axis: float, rotation: float) -> np.ndarray:
    """The item's corners after tilting its plane by ``tilt`` degrees about an in-plane
    ``axis`` (degrees) and rotating by ``rotation``, seen by a pinhole camera (``(4, 2)``,
    centred at 0, item pixel units)."""
    corners = np.array(
        [[-width / 2, -height / 2, 0], [width / 2, -height / 2, 0],
         [width / 2, height / 2, 0], [-width / 2, height / 2, 0]], dtype=np.float64,
    )  # fmt: skip
    a, t, r = math.radians(axis), math.radians(tilt), math.radians(rotation)
    u = np.array([math.cos(a), math.sin(a), 0.0])  # the tilt axis, in the item plane
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    tilt_m = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k  # Rodrigues
    spin = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    focal = 1.2 * max(width, height)  # a phone's field of view, about 45 degrees
    points = corners @ (spin @ tilt_m).T + np.array([0.0, 0.0, focal])
    return focal * points[:, :2] / points[:, 2:3]


def _area(quad: np.ndarray) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _cover(background: np.ndarray, width: int, height: int, rng: np.random.Generator):
    """A random ``width`` x ``height`` view of ``background`` (scaled to cover it)."""
    bh, bw = background.shape[:2]
    scale = max(width / bw, height / bh) * rng.uniform(1.0, 1.4)
    scaled = cv2.resize(
        background, (max(width, round(bw * scale)), max(height, round(bh * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
    )  # fmt: skip
    y = int(rng.integers(0, scaled.shape[0] - height + 1))
    x = int(rng.integers(0, scaled.shape[1] - width + 1))
    return scaled[y : y + height, x : x + width].copy()


def render_query(
    item: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator,
    conf: RenderConf = RenderConf(),
) -> tuple[np.ndarray, Rendered]:
    """A phone-photo-like query of ``item`` (``(H, W, 3)`` uint8 RGB): the item warped into
    ``background`` (any size, RGB) with a random tilt, rotation, size and place, then
    colour cast, glare, blur, noise and JPEG compression.

    Returns:
        ``(photo, rendered)``: the decoded JPEG photo (RGB uint8) and what was drawn.
    """
    if item.ndim != 3 or item.shape[2] != 3 or background.ndim != 3:
        raise ConfigError("item and background must be (H, W, 3) RGB arrays")
    long_side, short_side = conf.frame
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    photo = _cover(background, width, height, rng).astype(np.float32)

    ih, iw = item.shape[:2]
    tilt = float(rng.uniform(0, conf.tilt))
    rotation = float(rng.uniform(-conf.rotation, conf.rotation))
    quad = _quad(iw, ih, tilt, float(rng.uniform(0, 360)), rotation)
    target = float(rng.uniform(*conf.area))
    scale = math.sqrt(target * width * height / _area(quad))
    span = quad.max(0) - quad.min(0)
    scale = min(scale, 0.98 * width / span[0], 0.98 * height / span[1])  # whole in the frame
    quad = (quad - quad.min(0)) * scale
    room = np.array([width, height]) - (quad.max(0))
    quad += np.array([rng.uniform(0, room[0]), rng.uniform(0, room[1])])
    source = np.array([[0, 0], [iw, 0], [iw, ih], [0, ih]], dtype=np.float32)
    homography = cv2.getPerspectiveTransform(source, quad.astype(np.float32))
    warped = cv2.warpPerspective(
        item, homography, (width, height), flags=cv2.INTER_LINEAR
    ).astype(np.float32)  # fmt: skip
    mask = cv2.warpPerspective(
        np.ones((ih, iw), np.float32), homography, (width, height), flags=cv2.INTER_LINEAR
    )[..., None]
    photo = photo * (1 - mask) + warped * mask

    gains = 1 + rng.uniform(-conf.colour, conf.colour, 3)
    photo = photo * gains * rng.uniform(0.8, 1.15)
    glare = bool(rng.random() < conf.glare)
    if glare:  # a soft specular spot on the item
        cx, cy = quad[int(rng.integers(0, 4))] * 0.5 + quad.mean(0) * 0.5
        sigma = rng.uniform(0.05, 0.15) * max(width, height)
        yy, xx = np.mgrid[0:height, 0:width]
        spot = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[..., None]
        photo = photo + rng.uniform(120, 220) * spot * mask
    blur = float(rng.uniform(0, conf.blur))
    if blur > 0.3:
        photo = cv2.GaussianBlur(photo, (0, 0), blur)
    photo = photo + rng.normal(0, 3.0, photo.shape)
    quality = int(rng.integers(conf.jpeg[0], conf.jpeg[1] + 1))
    image = np.clip(photo, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ConfigError("OpenCV could not encode the rendered query as JPEG")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1].copy()
    area = _area(quad) / (width * height)
    return decoded, Rendered(
        homography.astype(np.float64), area, tilt, rotation, blur, glare, quality
    )


__all__ = ["RenderConf", "Rendered", "render_query"]
