"""Every registered local feature extractor: output contract, scaling, and a verified warp."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_local_matching import homography_corner_error

from lookalike.errors import ConfigError
from lookalike.local import (
    DESCRIPTORS,
    IMAGE_SIZE,
    KEYPOINTS,
    LOCAL_FEATURES,
    SCORES,
    create_local_extractor,
    default_local_settings,
    verify_pair,
)
from lookalike.local.features import (
    akaze_available,
    aliked_cached_weights,
    root_sift,
    torch_hub_dir,
)

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights" / "aliked-n16.pth"
SIDE = 256  # test images are SIDE x SIDE: fast on a shared 2-core machine
H_TRUE = np.array([[0.9, 0.1, 20.0], [-0.08, 0.95, 25.0], [2e-4, 1e-4, 1.0]])


def weights_for(name: str) -> Path:
    """The checkpoint of an ALIKED extractor (``aliked``, ``aliked-n16rot``)."""
    return WEIGHTS.with_name("aliked-n16rot.pth") if name == "aliked-n16rot" else WEIGHTS


def _skip_reason(name: str) -> str | None:
    if name == "akaze" and not akaze_available():
        return f"OpenCV {cv2.__version__} has no AKAZE (contrib build or OpenCV < 5 needed)"
    if name.startswith("aliked") and not weights_for(name).is_file():
        return f"ALIKED weights {weights_for(name)} are missing"
    return None


@pytest.fixture(scope="session")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a busy shared machine more threads only spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def extractors(one_torch_thread: None) -> dict:
    """One extractor per registered name (None where this machine cannot run it)."""
    out = {}
    for name in LOCAL_FEATURES:
        if _skip_reason(name):
            out[name] = None
            continue
        weights = weights_for(name) if name.startswith("aliked") else None
        out[name] = create_local_extractor(name, max_keypoints=512, max_side=SIDE, weights=weights)
    return out


def _square(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).convert("RGB").resize((SIDE, SIDE), Image.LANCZOS))


def _photo() -> np.ndarray:
    from skimage import data

    return _square(data.astronaut())


@pytest.fixture(scope="session")
def pair() -> dict[str, np.ndarray]:
    """A textured photo, its warp by H_TRUE, an unrelated photo and a flat grey image."""
    from skimage import data

    photo = _photo()
    return {
        "photo": photo,
        "warped": cv2.warpPerspective(photo, H_TRUE, (SIDE, SIDE)),
        "unrelated": _square(data.coffee()),
        "flat": np.full((SIDE, SIDE, 3), 128, np.uint8),
    }


@pytest.fixture(scope="session")
def features(extractors: dict, pair: dict) -> dict:
    """``features[name][image]``, computed once per session."""
    return {
        name: None if ex is None else {key: ex(img) for key, img in pair.items()}
        for name, ex in extractors.items()
    }


def _need(extractors: dict, name: str) -> None:
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", list(LOCAL_FEATURES))
def test_output_contract(name: str, extractors: dict, features: dict) -> None:
    _need(extractors, name)
    ex = extractors[name]
    feats = features[name]["photo"]
    n = len(feats[KEYPOINTS])
    assert 100 <= n <= 512
    assert feats[KEYPOINTS].shape == (n, 2) and feats[KEYPOINTS].dtype == np.float32
    assert feats[SCORES].shape == (n,) and np.all(np.diff(feats[SCORES]) <= 0)
    assert feats[DESCRIPTORS].shape == (n, ex.dim)
    assert feats[DESCRIPTORS].dtype == (np.uint8 if ex.binary else np.float32)
    assert feats[IMAGE_SIZE] == (SIDE, SIDE)
    assert feats[KEYPOINTS].min() >= -0.5 and feats[KEYPOINTS].max() <= SIDE - 0.5
    assert ex.settings() == {
        **default_local_settings(name),
        "max_keypoints": 512,
        "max_side": SIDE,
    }
    assert ex.metric == ("hamming" if ex.binary else "l2")


@pytest.mark.parametrize("name", list(LOCAL_FEATURES))
def test_warp_is_verified_and_homography_recovered(
    name: str, extractors: dict, features: dict
) -> None:
    _need(extractors, name)
    f = features[name]
    v = verify_pair(f["photo"], f["warped"], threshold_px=4.0)
    assert v.inliers >= 100, v
    assert homography_corner_error(v.model, H_TRUE, (SIDE, SIDE)) < 2.0
    # the inlier keypoints really map onto each other under the true homography
    p0 = f["photo"][KEYPOINTS][v.inlier_matches[:, 0]].astype(np.float64)
    p1 = f["warped"][KEYPOINTS][v.inlier_matches[:, 1]]
    mapped = cv2.perspectiveTransform(p0[None], H_TRUE)[0]
    assert np.median(np.linalg.norm(mapped - p1, axis=1)) < 1.5


@pytest.mark.parametrize("name", list(LOCAL_FEATURES))
def test_unrelated_and_flat_images_give_few_inliers(
    name: str, extractors: dict, features: dict
) -> None:
    _need(extractors, name)
    f = features[name]
    # measured 4-6 for the OpenCV features and 0 for ALIKED: a homography fits 4 of
    # any matches, chance adds a few
    assert verify_pair(f["photo"], f["unrelated"]).inliers < 12
    flat = f["flat"]
    if not name.startswith("aliked"):  # a detector on a constant image finds nothing
        assert len(flat[KEYPOINTS]) == 0 and flat[DESCRIPTORS].shape == (0, extractors[name].dim)
    for other in ("photo", "unrelated"):
        assert verify_pair(flat, f[other]).inliers == 0
        assert verify_pair(f[other], flat).inliers == 0


@pytest.mark.parametrize("name", list(LOCAL_FEATURES))
def test_downscaled_keypoints_map_back_to_original_pixels(
    name: str, extractors: dict, features: dict, pair: dict
) -> None:
    _need(extractors, name)
    # a 2x nearest-neighbour enlargement: INTER_AREA halving it restores the photo exactly,
    # so the detector sees the same pixels and only the coordinate mapping differs
    big = np.repeat(np.repeat(pair["photo"], 2, axis=0), 2, axis=1)
    got = extractors[name](big)
    ref = features[name]["photo"]
    assert got[IMAGE_SIZE] == (2 * SIDE, 2 * SIDE)
    np.testing.assert_allclose(got[KEYPOINTS], (ref[KEYPOINTS] + 0.5) * 2 - 0.5, atol=1e-3)
    np.testing.assert_array_equal(got[DESCRIPTORS], ref[DESCRIPTORS])


def test_original_size_maps_keypoints_of_a_decoded_copy(extractors: dict, features: dict) -> None:
    # what indexing does: features of the copy decoded at max_side, in pixels of the file
    ref = features["sift"]["photo"]
    image = _photo()
    got = extractors["sift"](image, original_size=(3 * SIDE, 2 * SIDE))
    assert got[IMAGE_SIZE] == (3 * SIDE, 2 * SIDE)
    expected = (ref[KEYPOINTS] + 0.5) * np.array([3.0, 2.0], np.float32) - 0.5
    np.testing.assert_allclose(got[KEYPOINTS], expected, rtol=1e-6)
    np.testing.assert_array_equal(got[DESCRIPTORS], ref[DESCRIPTORS])
    same = extractors["sift"](image, original_size=(SIDE, SIDE))
    np.testing.assert_array_equal(same[KEYPOINTS], ref[KEYPOINTS])
    with pytest.raises(ConfigError, match="original_size"):
        extractors["sift"](image, original_size=(0, 5))


def test_pil_and_gray_input(extractors: dict, pair: dict, features: dict) -> None:
    ex = extractors["sift"]
    from_pil = ex(Image.fromarray(pair["photo"]))
    np.testing.assert_array_equal(from_pil[KEYPOINTS], features["sift"]["photo"][KEYPOINTS])
    gray = cv2.cvtColor(pair["photo"], cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(ex(gray)[KEYPOINTS], features["sift"]["photo"][KEYPOINTS])
    with pytest.raises(ConfigError, match="uint8"):
        ex(pair["photo"].astype(np.float32))
    with pytest.raises(ConfigError, match="uint8"):
        ex(np.zeros((4, 4, 4), np.uint8))


def test_rootsift_is_sqrt_of_l1_normalised_sift(features: dict) -> None:
    sift = features["sift"]["photo"][DESCRIPTORS]
    root = features["rootsift"]["photo"][DESCRIPTORS]
    expected = np.array([np.sqrt(row / row.sum()) for row in sift.astype(np.float64)])
    np.testing.assert_allclose(root, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(root, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(root_sift(np.zeros((1, 128))), np.zeros((1, 128)))


def test_max_keypoints_caps() -> None:
    from skimage import data

    ex = create_local_extractor("orb", max_keypoints=40, max_side=256)
    feats = ex(data.astronaut())
    assert 35 <= len(feats[KEYPOINTS]) <= 40  # ORB keeps at most nfeatures, sometimes 1 less
    assert feats[IMAGE_SIZE] == (512, 512)  # the original size, though detected at 256


def test_factory_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sift, rootsift, orb, akaze, aliked"):
        create_local_extractor("surf")
    with pytest.raises(ConfigError, match="max_keypoints"):
        create_local_extractor("sift", max_keypoints=0)
    with pytest.raises(ConfigError, match="max_side"):
        create_local_extractor("sift", max_side=8)
    with pytest.raises(ConfigError, match="weights"):
        create_local_extractor("sift", weights="x.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        create_local_extractor("aliked", weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_local_extractor("aliked", weights=bad)
    if not akaze_available():
        with pytest.raises(ConfigError, match="contrib"):
            create_local_extractor("akaze")


def test_aliked_rejects_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    if _skip_reason("aliked"):
        pytest.skip(_skip_reason("aliked"))
    import torch

    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state.pop("score_head.0.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="not an aliked-n16 checkpoint"):
        create_local_extractor("aliked", weights=path)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    """No cached ALIKED weights and no name resolution; returns kornia's download calls."""
    import socket

    import torch
    from kornia.feature import ALIKED

    def no_dns(*args: object, **kwargs: object) -> None:
        raise OSError(-3, "Temporary failure in name resolution")

    calls: list[tuple] = []

    def download(*args: object, **kwargs: object) -> None:
        calls.append((args, kwargs))
        raise AssertionError("kornia was asked to download while offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(ALIKED, "from_pretrained", classmethod(download))
    return calls


def test_aliked_offline_without_weights_is_one_config_error(offline: list) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError) as error:
            create_local_extractor("aliked", max_keypoints=64, max_side=64)
    message = str(error.value)
    assert "--local-weights" in message and "aliked-n16.pth" in message
    assert "name resolution" in message  # why: the hosts do not resolve
    assert "\n" not in message
    assert offline == []  # no download tried: no retries, no pauses
    assert caught == []  # and no retry warnings


def test_aliked_offline_error_reaches_the_cli_as_one_line(offline: list, tmp_path, capsys):
    from lookalike.cli import main

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(_photo()).save(a)
    Image.fromarray(_photo()).save(b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["match", str(a), str(b), "--local", "aliked"])
    out, err = capsys.readouterr()
    assert rc == ConfigError.exit_code and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "--local-weights" in err
    assert offline == [] and caught == []


def test_torch_hub_dir_is_found_without_importing_torch(monkeypatch, tmp_path: Path) -> None:
    import sys

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert torch_hub_dir() == Path(torch.hub.get_dir()) == tmp_path / "th" / "hub"
    monkeypatch.delitem(sys.modules, "torch")  # as in a process that never imported it
    assert torch_hub_dir() == tmp_path / "th" / "hub"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert torch_hub_dir() == tmp_path / "xdg" / "torch" / "hub"


def test_default_local_features_need_no_download(offline: list, tmp_path, caplog, capsys):
    import logging

    from lookalike.cli import main
    from lookalike.index.manifest import Manifest, ModelIdentity
    from lookalike.local.conf import VERIFY_PRESETS, default_local_features
    from lookalike.rerank.verify import resolve_conf

    with caplog.at_level(logging.INFO, "lookalike"):
        assert default_local_features() == VERIFY_PRESETS["rootsift"]
    assert "rootsift" in caplog.text and "--local-weights" in caplog.text
    bare = Manifest({"model": "m"}, 8, ModelIdentity("m"))  # an index keeping no features
    assert resolve_conf(bare, None) == VERIFY_PRESETS["rootsift"]
    assert resolve_conf(bare, {"budget": 7}) == VERIFY_PRESETS["rootsift"].replace(budget=7)
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"")
    with_weights = VERIFY_PRESETS["default"].replace(weights=str(mine.resolve()))
    assert default_local_features(mine) == with_weights
    assert resolve_conf(bare, {"weights": str(mine)}) == with_weights
    with pytest.raises(ConfigError, match="no such file"):
        default_local_features(tmp_path / "none.pth")
    cached = tmp_path / "hub" / "checkpoints" / "aliked-n16.pth"  # where kornia downloads
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert aliked_cached_weights() == cached
    assert default_local_features() == VERIFY_PRESETS["default"] == resolve_conf(bare, None)
    cached.unlink()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(_photo()).save(a)
    Image.fromarray(cv2.warpPerspective(_photo(), H_TRUE, (SIDE, SIDE))).save(b)
    assert main(["match", str(a), str(b), "--json"]) == 0  # its defaults: offline, RootSIFT
    out = json.loads(capsys.readouterr().out)
    assert out["features"] == "rootsift" and out["inliers"] >= 20
    assert offline == []


def test_cli_choices_name_the_registries() -> None:
    """The CLI spells the choices out (so `--help` imports no OpenCV): they must be the
    registered names."""
    from lookalike.cli.options import FUSION_CHOICES, LOCAL_CHOICES
    from lookalike.local.matching import FUSIONS

    assert tuple(LOCAL_FEATURES) == LOCAL_CHOICES
    assert tuple(FUSIONS) == FUSION_CHOICES


def test_rotation_robust_aliked_is_its_own_feature_set() -> None:
    """``aliked-n16rot`` loads its own checkpoint and is recorded under its own name and
    model, so an index never mixes it with ``aliked``."""
    from lookalike.local.conf import VerifyConf, local_preset

    conf = local_preset("aliked-n16rot")
    assert conf.features == "aliked-n16rot" and conf.max_keypoints == 512
    settings = conf.feature_settings()
    assert settings["name"] == "aliked-n16rot" and settings["model"] == "aliked-n16rot"
    assert settings != VerifyConf().feature_settings()
    if _skip_reason("aliked-n16rot"):
        pytest.skip(_skip_reason("aliked-n16rot"))
    extractor = conf.replace(weights=str(weights_for("aliked-n16rot"))).create_extractor()
    assert extractor.settings() == settings
    feats = extractor(_photo())
    assert len(feats[KEYPOINTS]) == 512 and feats[DESCRIPTORS].shape == (512, 128)
