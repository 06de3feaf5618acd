"""Image loading: every format and mode to upright RGB, bad files as ImageError, listing
folders (decoding many files: tests/test_decoder_pool.py)."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from lookalike import images
from lookalike.errors import ConfigError, ImageError
from lookalike.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    decode_image,
    decode_many,
    file_hash,
    list_images,
    load_image,
    to_rgb,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
_REAL_DECODE_CHUNK = images._decode_chunk


def halves(width: int = 64, height: int = 32) -> Image.Image:
    """RGB image, left half red and right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = RED
    arr[:, width // 2 :] = BLUE
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noisy_jpeg(width: int, height: int, **kwargs: object) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=90, **kwargs)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def px(img: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(img)[y, x].astype(int)


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "fmt", "kwargs", "tol"),
    [
        (".jpg", "JPEG", {"quality": 95}, 12),
        (".png", "PNG", {}, 0),
        (".webp", "WEBP", {"lossless": True}, 0),
        (".bmp", "BMP", {}, 0),
        (".tif", "TIFF", {}, 0),
        (".gif", "GIF", {}, 0),
    ],
)
def test_formats_decode_to_rgb(tmp_path: Path, ext: str, fmt: str, kwargs: dict, tol: int) -> None:
    path = write(tmp_path / f"img{ext}", encode(halves(), fmt, **kwargs))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 32)
    assert np.abs(px(img, 8, 16) - RED).max() <= tol
    assert np.abs(px(img, 56, 16) - BLUE).max() <= tol


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 8), c) for c in (RED, (0, 255, 0), BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    img = load_image(write(tmp_path / "anim.gif", buf.getvalue()))
    assert img.size == (16, 8)
    assert (np.asarray(img) == RED).all()


def test_format_is_sniffed_not_taken_from_extension(tmp_path: Path) -> None:
    img = load_image(write(tmp_path / "really_png.jpg", encode(halves(), "PNG")))
    assert tuple(px(img, 0, 0)) == RED


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(ImageError, match=r"upload\.ppm is not a readable image"):
        decode_image(encode(halves(), "PPM"), name="upload.ppm")


# --- modes ---------------------------------------------------------------------------------


def _palette(mode: str = "P") -> Image.Image:
    img = Image.new(mode, (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    return img


def _p() -> Image.Image:
    img = _palette()
    img.putpixel((1, 0), 1)
    return img


def _p_transparent() -> Image.Image:
    img = _p()
    img.info["transparency"] = 0
    return img


def _array(mode: str, values: list) -> Image.Image:
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    img = Image.new(mode, (len(values), 1))
    img.frombytes(np.asarray([values], dtype=dtype).tobytes())
    return img


def _one_bit() -> Image.Image:
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    return img


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.fromarray(np.array([[10, 250]], np.uint8)), [(10,) * 3, (250,) * 3]),
        (lambda: Image.new("LA", (1, 1), (100, 0)), [WHITE]),
        (lambda: Image.new("LA", (1, 1), (100, 255)), [(100,) * 3]),
        (_p, [(10, 20, 30), (200, 100, 50)]),
        (_p_transparent, [WHITE, (200, 100, 50)]),
        (lambda: Image.new("RGBA", (1, 1), (255, 0, 0, 0)), [WHITE]),
        (lambda: Image.new("RGBA", (1, 1), (255, 0, 0, 255)), [RED]),
        (lambda: Image.new("RGBA", (1, 1), (0, 0, 0, 128)), [(127,) * 3]),
        (lambda: Image.new("CMYK", (1, 1), (0, 255, 255, 0)), [RED]),
        (lambda: Image.new("CMYK", (1, 1), (0, 0, 0, 255)), [(0, 0, 0)]),
        (lambda: _array("I;16", [0, 65535, 25700]), [(0,) * 3, (255,) * 3, (100,) * 3]),
        (lambda: _array("I;16B", [0, 65535]), [(0,) * 3, (255,) * 3]),
        (lambda: _array("I", [0, 200]), [(0,) * 3, (200,) * 3]),  # 8-bit values kept
        (lambda: _array("I", [0, 65535]), [(0,) * 3, (255,) * 3]),  # 16-bit range
        (lambda: _array("F", [0.0, 0.5, 1.0]), [(0,) * 3, (128,) * 3, (255,) * 3]),
        (_one_bit, [(0,) * 3, (255,) * 3]),
    ],
    ids=[
        "L",
        "LA-clear",
        "LA-opaque",
        "P",
        "P-transparency",
        "RGBA-clear",
        "RGBA-opaque",
        "RGBA-half",
        "CMYK-red",
        "CMYK-black",
        "I;16",
        "I;16B",
        "I-8bit",
        "I-16bit",
        "F",
        "1",
    ],
)
def test_to_rgb_modes(make: object, expected: list[tuple[int, int, int]]) -> None:
    src = make()  # type: ignore[operator]
    out = to_rgb(src)
    assert out.mode == "RGB" and out.size == src.size
    assert [tuple(p) for p in np.asarray(out)[0].tolist()] == expected


def test_rgb_with_trns_key_is_composited() -> None:
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), RED)
    img.info["transparency"] = (1, 2, 3)
    assert np.asarray(to_rgb(img))[0].tolist() == [list(WHITE), list(RED)]


def test_rgba_png_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    img.putpixel((0, 0), (0, 255, 0, 0))
    out = load_image(write(tmp_path / "a.png", encode(img, "PNG")))
    assert np.asarray(out)[0].tolist() == [list(WHITE), list(BLUE)]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_file_with_transparency(tmp_path: Path, fmt: str) -> None:
    data = encode(_p(), fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = load_image(write(tmp_path / f"p.{fmt.lower()}", data))
    assert np.asarray(out)[0].tolist() == [list(WHITE), [200, 100, 50]]


def test_16bit_png_scaled_to_8bit(tmp_path: Path) -> None:
    data = encode(_array("I;16", [0, 65535, 257 * 7]), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = load_image(write(tmp_path / "deep.png", data))
    assert np.asarray(out)[0].tolist() == [[0] * 3, [255] * 3, [7] * 3]


@pytest.mark.parametrize(("mode", "fmt"), [("1", "PNG"), ("1", "BMP"), ("L", "TIFF")])
def test_bilevel_and_grey_files(tmp_path: Path, mode: str, fmt: str) -> None:
    img = Image.new(mode, (2, 1))
    img.putpixel((1, 0), 255 if mode == "L" else 1)
    out = load_image(write(tmp_path / f"x.{fmt.lower()}", encode(img, fmt)))
    assert np.asarray(out)[0].tolist() == [[0] * 3, [255] * 3]


def test_cmyk_jpeg_file(tmp_path: Path) -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(write(tmp_path / "cmyk.jpg", data))
    assert np.abs(px(out, 8, 8) - RED).max() <= 12


# --- EXIF orientation, draft, resize, box ----------------------------------------------------


def oriented_jpeg(orientation: int, width: int = 40, height: int = 20) -> bytes:
    """JPEG stored ``width x height``, blue with a red top-left corner (in storage)."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:] = BLUE
    arr[: height // 4, : width // 4] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    # 6 displays the stored image turned 90 degrees clockwise, 8 counter-clockwise
    [(6, "top-right"), (8, "bottom-left")],
)
def test_exif_orientation(tmp_path: Path, orientation: int, red_corner: str) -> None:
    img = load_image(write(tmp_path / "o.jpg", oriented_jpeg(orientation)))
    assert img.size == (20, 40)
    corners = {"top-left": (2, 2), "top-right": (17, 2), "bottom-left": (2, 37)}
    for name, (x, y) in corners.items():
        want = RED if name == red_corner else BLUE
        assert np.abs(px(img, x, y) - want).max() <= 40, name


def test_box_is_in_upright_coordinates() -> None:
    data = oriented_jpeg(6, 400, 200)  # upright 200x400, red block x 150..200, y 0..100
    crop = decode_image(data, box=(158, 8, 192, 92))
    assert crop.size == (34, 84)
    assert np.abs(np.asarray(crop).astype(int) - RED).max() <= 40
    assert (np.asarray(decode_image(data, box=(8, 8, 142, 392)))[..., 2] > 200).all()  # blue


def test_jpeg_draft_really_downsizes(monkeypatch: pytest.MonkeyPatch) -> None:
    drafted: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple | None) -> object:
        out = real_draft(self, mode, size)
        drafted.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = encode(halves(2000, 1000), "JPEG", quality=90)
    img = decode_image(data, max_side=250)
    assert drafted == [(250, 125)]  # decoded at 1/8 scale, not at 2000x1000
    assert img.size == (250, 125)
    assert np.abs(px(img, 30, 60) - RED).max() <= 12
    assert np.abs(px(img, 220, 60) - BLUE).max() <= 12
    drafted.clear()
    assert decode_image(data, max_side=250, box=(0, 0, 2000, 1000)).size == (250, 125)
    assert drafted == []  # no draft with a box


def test_draft_with_exif_keeps_upright_original_size(tmp_path: Path) -> None:
    path = write(tmp_path / "tall.jpg", oriented_jpeg(6, 2000, 1000))
    (d,) = decode_many([path], max_side=250, workers=0)
    assert d.error is None
    assert (d.width, d.height) == (1000, 2000)
    assert d.image is not None and d.image.shape == (250, 125, 3)


@pytest.mark.parametrize(("w", "h", "expected"), [(300, 100, (60, 20)), (100, 300, (20, 60))])
def test_resize_long_side(w: int, h: int, expected: tuple[int, int]) -> None:
    assert decode_image(encode(halves(w, h), "PNG"), max_side=60).size == expected


def test_no_upscale_unless_asked() -> None:
    data = encode(halves(64, 32), "PNG")
    assert decode_image(data, max_side=128).size == (64, 32)
    assert decode_image(data, max_side=None).size == (64, 32)
    big = decode_image(data, max_side=128, upscale=True)
    assert big.size == (128, 64)
    assert tuple(px(big, 10, 30)) == RED and tuple(px(big, 120, 30)) == BLUE


def test_box_crops_in_original_coordinates_then_resizes() -> None:
    data = encode(halves(100, 50), "PNG")
    right = decode_image(data, box=(50, 0, 100, 50), max_side=10)
    assert right.size == (10, 10)
    assert (np.asarray(right) == BLUE).all()
    clipped = decode_image(data, box=(89.5, -10, 130, 60))  # clipped, rounded outwards
    assert clipped.size == (11, 50)


@pytest.mark.parametrize(
    "box", [(60, 10, 50, 20), (200, 0, 300, 10), (1, 2, 3), (0, 0, float("nan"), 5)]
)
def test_bad_box(box: tuple) -> None:
    with pytest.raises(ImageError, match=r"Box .* q\.png"):
        decode_image(encode(halves(100, 50), "PNG"), box=box, name="q.png")


# --- bad files --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_side", [None, 250])
def test_truncated_jpeg(tmp_path: Path, max_side: int | None) -> None:
    data = noisy_jpeg(800, 400)
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning-only success would fail here too
        with pytest.raises(ImageError, match=r"cut\.jpg.*truncated"):
            load_image(path, max_side=max_side)


def test_truncated_png(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageError, match=r"cut\.png"):
        load_image(write(tmp_path / "cut.png", data[: len(data) // 2]))


def test_corrupt_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "junk.jpg", b"definitely not an image" * 10)
    with pytest.raises(ImageError, match=r"junk\.jpg is not a readable image"):
        load_image(path)
    with pytest.raises(ImageError, match=r"soi\.jpg is not a readable image"):
        decode_image(b"\xff\xd8\xff" + bytes(range(256)) * 4, name="soi.jpg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = encode(Image.fromarray(noise), "PNG")
    garbled = png[:100] + bytes(200) + png[300:]  # valid header, broken zlib stream
    with pytest.raises(ImageError, match=r"Cannot decode image garbled\.png .*corrupt"):
        decode_image(garbled, name="garbled.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_the_magic_check_takes_every_supported_format(fmt: str) -> None:
    assert images._known_magic(encode(halves(), fmt)[:16])


def test_the_magic_check_takes_every_tiff_prefix_pil_takes() -> None:
    from PIL import TiffImagePlugin

    assert all(images._known_magic(prefix + bytes(12)) for prefix in TiffImagePlugin.PREFIXES)


def test_a_huge_non_image_is_refused_from_its_first_bytes(tmp_path: Path) -> None:
    """A 2 GB file named .jpg is refused with the usual message without being read whole."""
    import tracemalloc

    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.write(b"this is no image at all")
        f.truncate(2**31)  # sparse: 2 GB on paper, nothing on disk
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"huge\.jpg is not a readable image: unknown format"):
            load_image(path)
        (d,) = decode_many([path], max_side=64, workers=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert "huge.jpg is not a readable image" in d.error and d.image is None
    # its stat is kept, so that a rerun does not try it again; it was never hashed
    assert (d.size, d.mtime, d.content_hash) == (2**31, path.stat().st_mtime, None)


def test_zero_byte_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(write(tmp_path / "empty.png", b""))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.jpg does not exist"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_refused_with_limit() -> None:
    with pytest.raises(ImageError, match=r"bomb\.png is 20x20 = 400 pixels.*limit of 100"):
        decode_image(encode(halves(20, 20), "PNG"), max_pixels=100, name="bomb.png")
    assert MAX_PIXELS == 120_000_000


def test_pil_bomb_protection_never_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(halves(20, 20), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL would warn at 400 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data).size == (20, 20)  # our limit decides, no warning escapes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises above 2x its limit
    with pytest.raises(ImageError, match=r"s\.png is too large"):
        decode_image(data, name="s.png")


def test_bad_max_side() -> None:
    with pytest.raises(ConfigError, match="max_side"):
        decode_image(encode(halves(), "PNG"), max_side=0)


def test_file_hash() -> None:
    assert file_hash(b"abc") == hashlib.blake2b(b"abc", digest_size=16).hexdigest()
    assert len(file_hash(b"")) == 32 and file_hash(b"a") != file_hash(b"b")


# --- list_images --------------------------------------------------------------------------


def test_list_images_nested(tmp_path: Path) -> None:
    for rel in [
        "a.JPG", "b.png", "c.Jpeg", "notes.txt", "noext", ".hidden.jpg",
        "sub/d.WebP", "sub/e.tiff", "sub/deeper/f.gif", "sub/deeper/g.BMP", "sub/h.tif",
        ".git/x.jpg", "sub/.cache/y.png",
    ]:  # fmt: skip
        write(tmp_path / rel, b"x")
    (tmp_path / "folder.jpg").mkdir()  # a directory with an image suffix is not a file
    found = list_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == [
        "a.JPG", "b.png", "c.Jpeg",
        "sub/d.WebP", "sub/deeper/f.gif", "sub/deeper/g.BMP", "sub/e.tiff", "sub/h.tif",
    ]  # fmt: skip
    assert found == sorted(found)
    flat = list_images(str(tmp_path), recursive=False)
    assert [p.name for p in flat] == ["a.JPG", "b.png", "c.Jpeg"]


def test_list_images_follows_symlinked_folder_once(tmp_path: Path) -> None:
    write(tmp_path / "real" / "a.jpg", b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path, tmp_path / "real" / "loop")  # a cycle must not recurse forever
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert len(rel) == 1 and rel[0] in ("link/a.jpg", "real/a.jpg")


def test_list_images_lists_broken_and_looping_links(tmp_path: Path) -> None:
    """They are listed so that indexing records them as failed, with the reason."""
    write(tmp_path / "real.jpg", encode(halves(), "JPEG"))
    os.symlink(tmp_path / "real.jpg", tmp_path / "good_link.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink("self.jpg", tmp_path / "self.jpg")
    os.symlink("pong.png", tmp_path / "ping.png")
    os.symlink("ping.png", tmp_path / "pong.png")
    os.symlink(tmp_path / "gone.txt", tmp_path / "broken.txt")  # not an image name
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "dir", tmp_path / "dir_link.jpg")  # a folder, not a file
    names = ["broken.jpg", "good_link.jpg", "ping.png", "pong.png", "real.jpg", "self.jpg"]
    assert [p.name for p in list_images(tmp_path)] == names
    assert [p.name for p in list_images(tmp_path, recursive=False)] == names
    out = {Path(d.path).name: d for d in decode_many(list_images(tmp_path), 32, workers=0)}
    assert out["good_link.jpg"].error is None and out["real.jpg"].error is None
    assert "broken.jpg is a broken symbolic link" in out["broken.jpg"].error
    for name in ("self.jpg", "ping.png", "pong.png"):
        assert f"{name} is a symbolic link loop" in out[name].error
    with pytest.raises(ImageError, match=r"broken\.jpg is a broken symbolic link .*gone\.jpg"):
        load_image(tmp_path / "broken.jpg")


def test_list_images_empty_and_missing(tmp_path: Path) -> None:
    assert list_images(tmp_path) == []
    with pytest.raises(ImageError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(ImageError, match="not a directory"):
        list_images(write(tmp_path / "f.jpg", b"x"))


def test_extensions_constant() -> None:
    expected = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    assert isinstance(IMAGE_EXTENSIONS, frozenset) and expected == IMAGE_EXTENSIONS
