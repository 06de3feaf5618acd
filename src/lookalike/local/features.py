"""Local features: keypoints with descriptors, from OpenCV (SIFT, RootSIFT, ORB, AKAZE) or ALIKED.

Every extractor maps an ``(H, W, 3)`` uint8 RGB image (or a PIL image) to a dict keyed by the
constants below, with at most ``max_keypoints`` keypoints, best score first. Images whose
long side exceeds ``max_side`` are detected on a downscaled copy; keypoints always come back
in pixels of the image that was passed in (pixel centres at integer coordinates, OpenCV's
convention).

    extractor = create_local_extractor("rootsift", max_keypoints=1024)
    feats = extractor(np.asarray(load_image("a.jpg")))
    feats[KEYPOINTS].shape  # (N, 2)
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from lookalike.errors import ConfigError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

KEYPOINTS = "keypoints"  # (N, 2) float32 x, y in pixels of the original image
DESCRIPTORS = "descriptors"  # (N, d) float32 (float descriptors) or uint8 (binary, d bytes)
SCORES = "scores"  # (N,) float32 detector response, descending
IMAGE_SIZE = "image_size"  # (width, height) of the original image, pixels

ALIKED_MODELS = ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")


def empty_features(dim: int, binary: bool, image_size: tuple[int, int] = (0, 0)) -> dict:
    """A feature dict with no keypoints (what a flat image gives)."""
    return {
        KEYPOINTS: np.zeros((0, 2), np.float32),
        DESCRIPTORS: np.zeros((0, dim), np.uint8 if binary else np.float32),
        SCORES: np.zeros((0,), np.float32),
        IMAGE_SIZE: (int(image_size[0]), int(image_size[1])),
    }


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB from a PIL image or an RGB / grayscale uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ConfigError(f"expected an (H, W, 3) uint8 array or a PIL image, got {type(image)}")
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ConfigError(
            f"expected an (H, W, 3) or (H, W) uint8 image, got {image.shape} {image.dtype}"
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first (ties keep detection order)."""
    order = np.argsort(-scores, kind="stable")
    return order[:k]


class LocalExtractor:
    """Base class: downscaling, top-k selection and mapping back to original pixels.

    Subclasses set the class attributes and implement :meth:`_detect`.

    Args:
        max_keypoints: keypoints kept per image, highest score first.
        max_side: long side, pixels, of the image the detector sees; larger images are
            downscaled (INTER_AREA), smaller ones are used as they are.
    """

    name: ClassVar[str]
    dim: ClassVar[int]  # descriptor length: floats, or bytes for binary descriptors
    binary: ClassVar[bool]  # uint8 bit-string descriptors compared by Hamming distance

    def __init__(self, max_keypoints: int = 1024, max_side: int = 1024) -> None:
        for what, value in (("max_keypoints", max_keypoints), ("max_side", max_side)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ConfigError(f"{what} must be a positive integer, got {value!r}")
        if max_side < 32:
            raise ConfigError(f"max_side must be at least 32 pixels, got {max_side}")
        self.max_keypoints = int(max_keypoints)
        self.max_side = int(max_side)

    @property
    def metric(self) -> str:
        """Descriptor distance for :func:`~lookalike.local.matching.match_mutual_nn`."""
        return "hamming" if self.binary else "l2"

    def settings(self) -> dict[str, Any]:
        """What defines the features (stored beside them and compared on reopening)."""
        return {
            "name": self.name,
            "max_keypoints": self.max_keypoints,
            "max_side": self.max_side,
            "dim": self.dim,
            "binary": self.binary,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __call__(
        self, image: np.ndarray | Image.Image, original_size: tuple[int, int] | None = None
    ) -> dict:
        """Detect and describe.

        Args:
            image: ``(H, W, 3)`` uint8 RGB (or ``(H, W)`` gray) array, or a PIL image.
            original_size: ``(width, height)`` of the file ``image`` was downscaled from
                (e.g. ``Decoded.width, Decoded.height``); keypoints are then given in its
                pixels. None: ``image`` is the original.

        Returns:
            A dict with ``N <= max_keypoints`` (0 for an image without texture):
            ``KEYPOINTS`` (N, 2) float32 x, y in pixels of the original image;
            ``DESCRIPTORS`` (N, dim) float32, or uint8 bit strings for binary extractors;
            ``SCORES`` (N,) float32, descending; ``IMAGE_SIZE`` (width, height) of the
            original image.
        """
        rgb = as_rgb_array(image)
        feats = self._extract(rgb)
        if original_size is None or tuple(original_size) == feats[IMAGE_SIZE]:
            return feats
        width, height = (int(v) for v in original_size)
        if width < 1 or height < 1:
            raise ConfigError(
                f"original_size must be a positive (width, height), got {original_size}"
            )
        factor = np.array([width / rgb.shape[1], height / rgb.shape[0]], np.float32)
        feats[KEYPOINTS] = (feats[KEYPOINTS] + 0.5) * factor - 0.5
        feats[IMAGE_SIZE] = (width, height)
        return feats

    def _extract(self, rgb: np.ndarray) -> dict:
        """Features of ``rgb`` in its own pixels."""
        height, width = rgb.shape[:2]
        scale = self.max_side / max(height, width)
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        else:
            small = rgb
        kpts, scores, desc = self._detect(small)
        if len(kpts) == 0:
            return empty_features(self.dim, self.binary, (width, height))
        keep = top_k(scores, self.max_keypoints)
        kpts = kpts[keep].astype(np.float32)
        if small is not rgb:  # pixel centres: x_orig + 0.5 = (x_small + 0.5) * width / w_small
            sx = width / small.shape[1]
            sy = height / small.shape[0]
            kpts = (kpts + 0.5) * np.array([sx, sy], np.float32) - 0.5
        return {
            KEYPOINTS: np.ascontiguousarray(kpts, dtype=np.float32),
            DESCRIPTORS: np.ascontiguousarray(desc[keep]),
            SCORES: np.ascontiguousarray(scores[keep], dtype=np.float32),
            IMAGE_SIZE: (int(width), int(height)),
        }

    def _detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(h, w, 3)`` uint8 -> keypoints ``(n, 2)``, scores ``(n,)``, descriptors."""
        raise NotImplementedError


class _OpenCVExtractor(LocalExtractor):
    """A ``cv2.Feature2D`` detector-descriptor run on the grayscale image."""

    def _make(self) -> cv2.Feature2D:
        raise NotImplementedError

    def __init__(self, max_keypoints: int = 1024, max_side: int = 1024) -> None:
        super().__init__(max_keypoints, max_side)
        self._cv = self._make()

    def _detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        keypoints, desc = self._cv.detectAndCompute(gray, None)
        if desc is None or len(keypoints) == 0:
            return np.zeros((0, 2), np.float32), np.zeros((0,), np.float32), np.zeros((0, 0))
        kpts = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
        scores = np.array([k.response for k in keypoints], dtype=np.float32)
        return kpts, scores, self._post(desc)

    def _post(self, desc: np.ndarray) -> np.ndarray:
        return desc.astype(np.uint8 if self.binary else np.float32, copy=False)


class SIFTExtractor(_OpenCVExtractor):
    """OpenCV SIFT (Lowe 2004): 128 floats, integer-valued in 0..255; L2 distance."""

    name = "sift"
    dim = 128
    binary = False

    def _make(self) -> cv2.Feature2D:
        return cv2.SIFT_create(nfeatures=self.max_keypoints)


def root_sift(desc: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """RootSIFT (Arandjelović & Zisserman 2012): L1-normalise, then square root.

    Args:
        desc: ``(N, 128)`` non-negative SIFT descriptors.

    Returns:
        ``(N, 128)`` float32 with unit L2 norm (rows of zeros stay zero).
    """
    desc = np.asarray(desc, dtype=np.float32)
    l1 = np.abs(desc).sum(axis=1, keepdims=True)
    return np.sqrt(desc / np.maximum(l1, eps)).astype(np.float32)


class RootSIFTExtractor(SIFTExtractor):
    """SIFT keypoints with RootSIFT descriptors (Euclidean on them = Hellinger on SIFT)."""

    name = "rootsift"

    def _post(self, desc: np.ndarray) -> np.ndarray:
        return root_sift(desc)


class ORBExtractor(_OpenCVExtractor):
    """OpenCV ORB (Rublee et al. 2011): 256-bit binary descriptors, Hamming distance."""

    name = "orb"
    dim = 32
    binary = True

    def _make(self) -> cv2.Feature2D:
        return cv2.ORB_create(nfeatures=self.max_keypoints)


def _akaze_factory() -> Any:
    """``cv2.AKAZE_create`` (OpenCV 4) or ``cv2.xfeatures2d.AKAZE_create`` (OpenCV 5 contrib)."""
    create = getattr(cv2, "AKAZE_create", None)
    if create is None and hasattr(cv2, "xfeatures2d"):
        create = getattr(cv2.xfeatures2d, "AKAZE_create", None)
    return create


def akaze_available() -> bool:
    """Whether the installed OpenCV build has AKAZE (OpenCV 5 moved it to the contrib build)."""
    return _akaze_factory() is not None


class AKAZEExtractor(_OpenCVExtractor):
    """OpenCV AKAZE (Alcantarilla et al. 2013): 61-byte binary M-LDB descriptors, Hamming."""

    name = "akaze"
    dim = 61
    binary = True

    def _make(self) -> cv2.Feature2D:
        create = _akaze_factory()
        if create is None:
            raise ConfigError(
                f"local features 'akaze' need OpenCV's AKAZE, which OpenCV {cv2.__version__} "
                "ships only in the contrib build; install opencv-python-headless<5 or "
                "opencv-contrib-python-headless, or use sift, rootsift, orb or aliked"
            )
        return create()


class ALIKEDExtractor(LocalExtractor):
    """ALIKED (Zhao et al. 2023) through kornia: 128 floats, L2-normalised; L2 distance.

    Args:
        max_keypoints: the top-scoring local maxima of the score map kept per image.
        max_side: long side of the network input, pixels.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        weights: a local ALIKED checkpoint (``aliked-n16.pth``, BSD licence); None lets
            kornia download the official one on first use.
        model: kornia config name, one of :data:`ALIKED_MODELS`; must match ``weights``
            (None: :attr:`default_model`).
    """

    name = "aliked"
    dim = 128
    binary = False
    default_model = "aliked-n16"  # the kornia config this name stands for

    def __init__(
        self,
        max_keypoints: int = 1024,
        max_side: int = 1024,
        device: str = "cpu",
        weights: str | Path | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(max_keypoints, max_side)
        model = model or self.default_model
        if model not in ALIKED_MODELS:
            raise ConfigError(f"unknown ALIKED model {model!r}; valid: {', '.join(ALIKED_MODELS)}")
        from lookalike.runtime import resolve_device

        self.model_name = model
        self.device = resolve_device(device)
        self.net = _load_aliked(model, max_keypoints, self.device, weights)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "model": self.model_name}

    def _detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(self.device)
        x = x[None].float().div_(255.0)
        with torch.inference_mode():
            out = self.net(x)[0]
        return (
            out.keypoints.float().cpu().numpy(),
            out.keypoint_scores.float().cpu().numpy(),
            out.descriptors.float().cpu().numpy(),
        )


class ALIKEDRotExtractor(ALIKEDExtractor):
    """ALIKED trained with rotation augmentation (``aliked-n16rot``): for photos rotated in
    the plane (a phone held askew), at the same cost as ``aliked``; its own checkpoint
    (``aliked-n16rot.pth``)."""

    name = "aliked-n16rot"
    default_model = "aliked-n16rot"


def _load_aliked(
    model: str, max_keypoints: int, device: str, weights: str | Path | None
) -> torch.nn.Module:
    """A kornia ALIKED in eval mode returning the ``max_keypoints`` best local maxima."""
    import torch

    try:
        from kornia.feature import ALIKED
    except ImportError as error:
        raise ConfigError(
            f"local features 'aliked' need kornia ({error}); pip install kornia"
        ) from None
    # detection_threshold=0 selects kornia's top-k mode: a fixed budget of the best maxima
    # rather than every maximum above a score, so weakly textured images still get features.
    kwargs = {"max_num_keypoints": max_keypoints, "detection_threshold": 0.0}
    if weights is None:
        weights = aliked_cached_weights(model)  # downloaded before: no network needed
        if weights is None:
            return _download_aliked(ALIKED, model, device, kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"ALIKED checkpoint {path} does not exist; give the path of {model}.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"cannot read ALIKED checkpoint {path}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    net = ALIKED(model_name=model, **kwargs)
    try:
        result = net.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path} is not an {model} checkpoint: {error}") from None
    # the checkpoint has no entry for the detector's constant grid buffer
    missing = [k for k in result.missing_keys if k != "dkd.hw_grid"]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{path} is not an {model} checkpoint (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); pass the matching model name or checkpoint"
        )
    return net.to(device).eval()


def torch_hub_dir() -> Path:
    """torch's hub directory (``torch.hub.get_dir()``), found without importing torch:
    ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``."""
    torch = sys.modules.get("torch")
    if torch is not None:  # imported: honour a torch.hub.set_dir()
        return Path(torch.hub.get_dir())
    cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
    return Path(home).expanduser() / "hub"


def aliked_cached_weights(model: str = "aliked-n16") -> Path | None:
    """The ALIKED checkpoint kornia downloaded before (``<hub>/checkpoints/<model>.pth``),
    or None when there is none."""
    path = torch_hub_dir() / "checkpoints" / f"{model}.pth"
    return path if path.is_file() else None


ALIKED_HOSTS = ("huggingface.co", "github.com")  # where kornia downloads the weights from


def _offline_reason() -> str | None:
    """Why the ALIKED weights cannot be downloaded now (no DNS for their hosts), or None."""
    import socket

    for host in ALIKED_HOSTS:
        try:
            socket.getaddrinfo(host, 443)
            return None
        except OSError as error:
            reason = f"{host}: {error.strerror or error}"
    return reason


def _download_aliked(aliked: type, model: str, device: str, kwargs: dict) -> torch.nn.Module:
    """kornia's download of the official weights, quietly; a one-line error when offline.

    kornia retries each of its two sources three times with pauses and a warning per try;
    offline that is six warnings and seconds for nothing, so a failed name lookup of its
    hosts ends it at once.
    """
    import contextlib
    import io
    import warnings

    import torch

    hint = (
        f"give a local copy of {model}.pth with --local-weights PATH "
        "(Python: VerifyConf(weights=PATH))"
    )
    offline = _offline_reason()
    if offline is not None:
        raise ConfigError(
            f"the ALIKED weights ({model}.pth) are not on this machine and cannot be "
            f"downloaded ({offline}); {hint}"
        )
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return aliked.from_pretrained(model, device=torch.device(device), **kwargs)
    except Exception as error:
        raise ConfigError(
            f"cannot download the ALIKED weights ({model}.pth: {type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}); {hint}"
        ) from None


LOCAL_FEATURES: dict[str, type[LocalExtractor]] = {
    "sift": SIFTExtractor,
    "rootsift": RootSIFTExtractor,
    "orb": ORBExtractor,
    "akaze": AKAZEExtractor,
    "aliked": ALIKEDExtractor,
    "aliked-n16rot": ALIKEDRotExtractor,
}


def local_feature_class(name: str) -> type[LocalExtractor]:
    """The registered extractor class for ``name``.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    try:
        return LOCAL_FEATURES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown local features {name!r}; valid: {', '.join(LOCAL_FEATURES)}"
        ) from None


def default_local_settings(name: str) -> dict[str, Any]:
    """:meth:`LocalExtractor.settings` of ``create_local_extractor(name)``, without building it."""
    cls = local_feature_class(name)
    settings: dict[str, Any] = {
        "name": cls.name,
        "max_keypoints": 1024,
        "max_side": 1024,
        "dim": cls.dim,
        "binary": cls.binary,
    }
    if issubclass(cls, ALIKEDExtractor):
        settings["model"] = cls.default_model
    return settings


def create_local_extractor(
    name: str,
    max_keypoints: int = 1024,
    max_side: int = 1024,
    device: str = "cpu",
    weights: str | Path | None = None,
) -> LocalExtractor:
    """A local feature extractor from :data:`LOCAL_FEATURES` by name.

    Args:
        name: ``sift``, ``rootsift``, ``orb``, ``akaze`` or ``aliked``.
        max_keypoints: keypoints kept per image, best score first.
        max_side: long side, pixels, the detector works at (keypoints are mapped back).
        device: where a learned model runs (``cpu``, ``cuda``, ``auto``); OpenCV ignores it.
        weights: checkpoint of a learned model (ALIKED); None downloads the official one.

    Raises:
        ConfigError: unknown name, bad sizes, weights for an OpenCV extractor, an unreadable
            checkpoint, or AKAZE on an OpenCV build without it.
    """
    cls = local_feature_class(name)
    if issubclass(cls, ALIKEDExtractor):
        return cls(max_keypoints, max_side, device=device, weights=weights)
    if weights is not None:
        raise ConfigError(f"local features {name!r} take no weights (only aliked does)")
    return cls(max_keypoints, max_side)
