"""Global descriptors: settings, arrays, files, queries; and the multi-view merge of search."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as tnf
from PIL import Image

from lookalike import functional as F
from lookalike.errors import ConfigError
from lookalike.extract import EXTRACT_PRESETS, Descriptors, ExtractConf, Extractor, get_preset
from lookalike.models import MODELS
from lookalike.pooling import POOLING
from lookalike.whitening import WhiteningConf

pytest_plugins = ("_fixtures",)
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Settings that never change a database descriptor, so an index does not pin them ...
RUNTIME_ONLY = {"query_rotations", "runtime", "device", "batch_size", "workers"}
# ... and the ones that do.
DESCRIPTOR_KEYS = {
    "model",
    "weights",
    "image_size",
    "upscale",
    "scales",
    "pooling",
    "gem_p",
    "rmac_levels",
    "whitening",
}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``(N, D)`` arrays."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def save_png(path: Path, img: np.ndarray) -> Path:
    Image.fromarray(img).save(path)
    return path


# --- ExtractConf -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 0},
        {"image_size": 31},
        {"image_size": -512},
        {"scales": ()},
        {"scales": (0.0,)},
        {"scales": (1.0, -0.5)},
        {"query_rotations": ()},
        {"query_rotations": (45,)},
        {"query_rotations": (0, 90, 100)},
        {"batch_size": 0},
        {"workers": -1},
    ],
)
def test_conf_refuses_bad_values(changes: dict) -> None:
    with pytest.raises(ConfigError):
        ExtractConf(**changes)
    with pytest.raises(ConfigError):  # replace validates too
        ExtractConf().replace(**changes)


def test_conf_accepts_edge_values() -> None:
    conf = ExtractConf(image_size=32, scales=(0.5,), query_rotations=(0, 90, 180, 270, -90))
    assert conf.image_size == 32
    assert ExtractConf(batch_size=1, workers=0).workers == 0


def test_conf_is_frozen() -> None:
    conf = ExtractConf()
    with pytest.raises(dataclasses.FrozenInstanceError):
        conf.image_size = 256  # type: ignore[misc]


def test_conf_replace() -> None:
    conf = ExtractConf()
    changed = conf.replace(image_size=256, pooling="gem")
    assert (changed.image_size, changed.pooling) == (256, "gem")
    assert conf.image_size == 512  # the original is untouched
    with pytest.raises(ConfigError, match="unknown extract settings: imgsize"):
        conf.replace(imgsize=256)


def test_conf_misspelled_field_is_an_error() -> None:
    with pytest.raises(TypeError):
        ExtractConf(imgsize=256)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "conf",
    [
        *EXTRACT_PRESETS.values(),
        ExtractConf(
            weights="/models/ckpt.pth",
            scales=(0.5, 1.0, 2.0),
            upscale=True,
            whitening=WhiteningConf(dim=64, shrinkage=0.1, power=0.4, min_images=8),
            query_rotations=(0, 90),
            runtime="torch",
            device="cpu",
            batch_size=2,
            workers=0,
        ),
    ],
)
def test_descriptor_round_trip(conf: ExtractConf) -> None:
    desc = conf.descriptor()
    excluded = {f.name for f in dataclasses.fields(ExtractConf)} - set(desc)
    assert excluded >= RUNTIME_ONLY
    assert set(desc) >= DESCRIPTOR_KEYS
    assert desc["scales"] == list(conf.scales)
    stored = json.loads(json.dumps(desc))  # what an index manifest keeps
    back = ExtractConf.from_descriptor(stored)
    assert back == conf.replace(**{key: getattr(ExtractConf(), key) for key in excluded})
    assert back.descriptor() == desc
    with_runtime = ExtractConf.from_descriptor(
        stored, **{key: getattr(conf, key) for key in excluded}
    )
    assert with_runtime == conf


def test_descriptor_override_unknown_key() -> None:
    with pytest.raises(ConfigError, match="unknown extract settings"):
        ExtractConf.from_descriptor(ExtractConf().descriptor(), gpu=True)


@pytest.mark.parametrize("name", sorted(EXTRACT_PRESETS))
def test_every_preset_constructs(name: str) -> None:
    preset = get_preset(name)
    assert preset is EXTRACT_PRESETS[name]
    rebuilt = ExtractConf(**{f.name: getattr(preset, f.name) for f in dataclasses.fields(preset)})
    assert rebuilt == preset
    assert preset.pooling in POOLING
    assert preset.model in MODELS  # presets work offline


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'fastest'") as err:
        get_preset("fastest")
    assert all(name in str(err.value) for name in EXTRACT_PRESETS)


# --- extract_arrays --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extractor(make_extractor: Callable[..., Extractor]) -> Extractor:
    """The test extractor: default settings (R-MAC, ONNX Runtime), 128 px images."""
    return make_extractor()


def test_arrays_give_unit_float32_rows(extractor: Extractor, photos: dict) -> None:
    out = extractor.extract_arrays(list(photos.values()))
    assert isinstance(out, Descriptors) and out.regions is None
    g = out.global_
    assert g.shape == (4, extractor.dim) and extractor.dim == 1280
    assert g.dtype == np.float32 and np.isfinite(g).all()
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-5)


def test_mixed_batch_equals_one_by_one(extractor: Extractor, photos: dict) -> None:
    images = [
        photos["chelsea"],
        photos["astronaut"],
        photos["coffee"][:80, :111],
        photos["rocket"],  # same shape as chelsea: batched with it
        photos["astronaut"][:97, :64],
    ]
    assert extractor.conf.batch_size < 3 or len({im.shape for im in images}) < len(images)
    together = extractor.extract_arrays(images).global_
    alone = np.concatenate([extractor.extract_arrays([im]).global_ for im in images])
    assert cosines(together, alone).min() > 0.9999


def test_batches_larger_than_batch_size(make_extractor: Callable[..., Extractor]) -> None:
    extractor = make_extractor(batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(5)]
    together = extractor.extract_arrays(images).global_
    alone = np.concatenate([extractor.extract_arrays([im]).global_ for im in images])
    assert cosines(together, alone).min() > 0.9999


def test_multiscale_sums_normalised_scales(
    make_extractor: Callable[..., Extractor], photos: dict
) -> None:
    # images arrive at the largest scale; each scale is that image shrunk by scale / largest
    extractor = make_extractor(scales=(0.75, 1.0, 1.5), pooling="rmac")
    img = photos["coffee"]
    mean = np.asarray(extractor.backbone.mean, np.float32)
    std = np.asarray(extractor.backbone.std, np.float32)
    x = torch.from_numpy(((img / np.float32(255) - mean) / std).transpose(2, 0, 1)[None].copy())
    total = torch.zeros(1, 1280)
    for factor in (0.5, 1 / 1.5, 1.0):
        size = (round(img.shape[0] * factor), round(img.shape[1] * factor))
        xs = x if factor == 1.0 else tnf.interpolate(x, size, mode="bilinear", antialias=True)
        d = F.rmac(extractor.runner(xs.numpy()), 3)
        total += d / torch.linalg.vector_norm(d)
    expected = (total / torch.linalg.vector_norm(total)).numpy()
    got = extractor.extract_arrays([img]).global_
    assert cosines(got, expected)[0] > 0.9999
    single = make_extractor().extract_arrays([img]).global_
    assert cosines(got, single)[0] < 0.9999  # the other scales do count


def recompressed(img: np.ndarray, scale: float = 0.9, quality: int = 60) -> np.ndarray:
    pil = Image.fromarray(img)
    pil = pil.resize(
        (round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BILINEAR
    )
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_near_duplicates_are_closer_than_different_images(
    extractor: Extractor, photos: dict
) -> None:
    originals = extractor.extract_arrays(list(photos.values())).global_
    copies = extractor.extract_arrays([recompressed(im) for im in photos.values()]).global_
    same = cosines(originals, copies)
    cross = originals @ originals.T
    different = cross[~np.eye(len(cross), dtype=bool)]
    assert same.min() > different.max() + 0.2, (same, different)


def test_regions_for_whitening(extractor: Extractor, photos: dict) -> None:
    images = [photos["chelsea"], photos["astronaut"]]
    out = extractor.extract_arrays(images, want_regions=True)
    np.testing.assert_array_equal(out.global_, extractor.extract_arrays(images).global_)
    assert out.regions is not None and len(out.regions) == 2
    for img, regions in zip(images, out.regions, strict=True):
        h, w = (-(-s // 32) for s in img.shape[:2])  # feature map: stride 32, "same" padding
        assert regions.shape == (1 + len(F.rmac_regions(h, w, 3)), 1280)
        assert regions.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(regions.astype(np.float32), axis=1), 1, atol=2e-3)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((64, 64, 3), np.float32),
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((1, 64, 64, 3), np.uint8),
        np.zeros((3, 64, 64), np.uint8),
    ],
    ids=["float32", "gray", "rgba", "4d", "chw"],
)
def test_arrays_refuse_wrong_dtype_or_shape(extractor: Extractor, bad: np.ndarray) -> None:
    with pytest.raises(ConfigError, match=r"\(H, W, 3\) uint8"):
        extractor.extract_arrays([np.zeros((64, 64, 3), np.uint8), bad])


def test_arrays_empty_nocrash(extractor: Extractor) -> None:
    out = extractor.extract_arrays([])
    assert out.global_.shape == (0, 1280) and out.global_.dtype == np.float32
    assert extractor.extract_arrays([], want_regions=True).regions == []


def test_arrays_single_tiny_image(extractor: Extractor) -> None:
    out = extractor.extract_arrays([np.full((8, 8, 3), 200, np.uint8)]).global_
    assert out.shape == (1, 1280) and np.isfinite(out).all()


# --- extract_files ---------------------------------------------------------------------------


def test_files_skip_bad_ones_without_raising(
    extractor: Extractor, photos: dict, tmp_path: Path
) -> None:
    names = list(photos)
    paths = [save_png(tmp_path / f"{n}.png", photos[n]) for n in names]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    paths.insert(1, tmp_path / "broken.jpg")
    paths.insert(3, tmp_path / "missing.png")
    chunks = list(extractor.extract_files(paths, chunk=2))
    assert [len(decoded) for decoded, _ in chunks] == [2, 2, 2]
    decoded = [d for chunk, _ in chunks for d in chunk]
    assert [d.index for d in decoded] == list(range(6))
    assert [d.error is None for d in decoded] == [True, False, True, False, True, True]
    rows = np.concatenate([desc.global_ for _, desc in chunks])
    assert rows.shape == (4, 1280)
    expected = extractor.extract_arrays([photos[n] for n in names]).global_
    assert cosines(rows, expected).min() > 0.9999


def test_files_all_bad_give_empty_rows(extractor: Extractor, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    chunks = list(extractor.extract_files([tmp_path / "a.png"], want_regions=True))
    assert len(chunks) == 1
    decoded, desc = chunks[0]
    assert decoded[0].error and desc.global_.shape == (0, 1280) and desc.regions == []


def test_files_empty_list(extractor: Extractor) -> None:
    assert list(extractor.extract_files([])) == []


# --- extract_query ---------------------------------------------------------------------------


def test_query_box_crops(extractor: Extractor, photos: dict, tmp_path: Path) -> None:
    img = photos["chelsea"]
    path = save_png(tmp_path / "chelsea.png", img)
    box = (30, 10, 110, 70)  # x1, y1, x2, y2 in pixels
    crop = np.ascontiguousarray(img[10:70, 30:110])
    out = extractor.extract_query(path, box=box)
    assert out.shape == (1, 1280) and out.dtype == np.float32
    assert cosines(out, extractor.extract_arrays([crop]).global_)[0] > 0.9999
    assert cosines(out, extractor.extract_query(path))[0] < 0.99


def test_query_rotations(extractor: Extractor, photos: dict, tmp_path: Path) -> None:
    img = photos["coffee"]
    path = save_png(tmp_path / "coffee.png", img)
    turned = save_png(tmp_path / "coffee-turned.png", np.rot90(img))  # 90 deg counter-clockwise
    out = extractor.extract_query(path, rotations=(0, 90))
    assert out.shape == (2, 1280)
    upright = extractor.extract_query(path)  # the conf's query_rotations: (0,)
    assert upright.shape == (1, 1280)
    assert cosines(out[:1], upright)[0] > 0.9999
    assert cosines(out[1:], extractor.extract_query(turned))[0] > 0.9999
    assert cosines(out[:1], out[1:])[0] < 0.99
