"""``Query``: every form of an image query ranks exactly like its file (bytes, PIL images, a
box, EXIF orientation), validation with clear messages, ``Query.of`` coercions, labels."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from conftest import distinct_image, write_images
from PIL import Image, ImageOps

from lookalike.errors import ConfigError
from lookalike.index import IndexStore, NewImage
from lookalike.indexing import index_folder
from lookalike.query import Query, QueryContext, check_box, check_rotations
from lookalike.search import Searcher

pytest_plugins = ("_fixtures",)

BOX = (10, 6, 70, 60)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, make_extractor):
    """Eight photos indexed with the small test model, and an open searcher on them."""
    root = tmp_path_factory.mktemp("query")
    paths = write_images(root / "images", 8, side=96)
    extractor = make_extractor()
    index_folder(root / "images", root / "index", extractor.conf, extractor=extractor)
    with Searcher.open(root / "index", extractor=extractor) as searcher:
        yield searcher, paths, root


def same(a, b) -> None:
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("box", [None, BOX])
def test_bytes_and_pil_rank_exactly_like_the_file(indexed, box):
    searcher, paths, _ = indexed
    path = paths[2]
    by_file = searcher.search([Query(image=path, box=box)], k=5)
    data = path.read_bytes()
    with Image.open(path) as img:
        pil = img.copy()
    for other in (data, bytearray(data), pil):
        same(searcher.search([Query(image=other, box=box)], k=5), by_file)
    same(searcher.search([str(path)], k=5), searcher.search([path], k=5))
    if box is None:
        assert by_file.ids[0, 0] == searcher.store.find_path(str(path.resolve())).id
    else:  # the box really crops: a crop scores below the whole image
        assert by_file.scores[0, 0] < searcher.search([path], k=1).scores[0, 0]


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """JPEG bytes whose pixels are stored turned, with the EXIF orientation (6: rotate 90
    degrees clockwise to view) that makes them ``upright`` again."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("box", [None, (4, 8, 60, 50)])
def test_exif_rotated_jpeg_bytes_rank_like_the_file(indexed, tmp_path, box):
    searcher, paths, _ = indexed
    data = exif_rotated_jpeg(distinct_image(3, side=96))
    path = tmp_path / "turned.jpg"
    path.write_bytes(data)
    by_file = searcher.search([Query(image=path, box=box)], k=5)
    same(searcher.search([Query(image=data, box=box)], k=5), by_file)
    # a PIL image is taken as it is: upright once the orientation is applied
    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img)
        raw = img.copy()
    same(searcher.search([Query(image=upright, box=box)], k=5), by_file)
    if box is None:  # upright, it is the indexed photo; the stored pixels alone are not
        photo = searcher.store.find_path(str(paths[3].resolve())).id
        assert by_file.ids[0, 0] == photo and by_file.scores[0, 0] > 0.95
        turned = searcher.search([raw], k=5)
        assert turned.scores[0, 0] < by_file.scores[0, 0] - 0.02


def test_unknown_and_failed_ids_are_config_errors(indexed, tmp_path):
    searcher, paths, _ = indexed
    with pytest.raises(ConfigError, match=r"no image with id 12345 in index .*index"):
        searcher.search([paths[0], 12345])
    with IndexStore.open(searcher.store.path, writable=True) as writer:
        (bad,) = writer.add(
            [NewImage(path="/x/broken.jpg", error="cannot identify image file")],
            np.zeros((0, searcher.store.dim), np.float32),
        )
    try:
        with pytest.raises(ConfigError, match=r"failed to index.*cannot identify image file"):
            searcher.search([bad])
    finally:
        with IndexStore.open(searcher.store.path, writable=True) as writer:
            writer.remove([bad])


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "got nothing"),
        ({"image": "a.jpg", "id": 3}, "got image, id"),
        ({"id": 3, "vector": np.ones(4, np.float32)}, "got id, vector"),
        ({"image": "a.jpg", "id": 1, "vector": np.ones(4)}, "got image, id, vector"),
        ({"id": 3, "box": BOX}, "ids and vectors take no box"),
        ({"vector": np.ones(4), "box": BOX}, "ids and vectors take no box"),
        ({"id": "3"}, "must be an integer"),
        ({"id": True}, "must be an integer"),
        ({"id": 2.0}, "must be an integer"),
        ({"vector": np.ones(4, np.int64)}, "float array"),
        ({"vector": np.ones((2, 2, 2))}, "float array"),
        ({"vector": np.zeros(0)}, "float array"),
        ({"vector": np.array([1.0, np.nan])}, "NaN"),
        ({"vector": np.ones((2, 4)), "rotations": (0,)}, "2 vector view.*got 1"),
        ({"vector": np.ones(4), "rotations": (0, 90)}, "1 vector view.*got 2"),
        ({"image": 3.5}, "file path, bytes or a PIL image, got float"),
        ({"image": ["a.jpg"]}, "got list"),
        ({"image": "a.jpg", "rotations": (0, 45)}, "multiples of 90"),
        ({"image": "a.jpg", "rotations": (90.5,)}, "multiples of 90"),
        ({"image": "a.jpg", "rotations": ()}, "at least one angle"),
        ({"image": "a.jpg", "rotations": 90}, "list of angles"),
        ({"image": "a.jpg", "rotations": ("up",)}, "angles in degrees"),
        ({"image": "a.jpg", "rotations": (True,)}, "angles in degrees"),
        ({"image": "a.jpg", "box": (10, 10, 5, 20)}, "empty or not finite"),
        ({"image": "a.jpg", "box": (0, 0, np.inf, 5)}, "empty or not finite"),
        ({"image": "a.jpg", "box": (0, 0, 5)}, "four numbers"),
        ({"image": "a.jpg", "box": "0,0,5,5"}, "four numbers"),
    ],
)
def test_invalid_queries_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Query(**kwargs)


def test_valid_queries_are_normalised():
    q = Query(image="a.jpg", box=[1, 2, 30, 40], rotations=[0, 270.0, np.int64(-90)])
    assert q.box == (1.0, 2.0, 30.0, 40.0) and all(isinstance(v, float) for v in q.box)
    assert q.rotations == (0, 270, -90) and all(type(a) is int for a in q.rotations)
    assert Query(id=np.int64(4)).id == 4 and type(Query(id=np.int64(4)).id) is int
    views = Query(vector=np.ones((2, 4), np.float16), rotations=(0, 90))
    assert views.vector.shape == (2, 4)
    assert check_box(None) is None and check_rotations((0,)) == (0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.id = 3  # type: ignore[misc]


def test_query_of_coerces_every_form(tmp_path):
    img = Image.new("RGB", (8, 8))
    v = np.ones(4, np.float32)
    assert Query.of("a.jpg") == Query(image="a.jpg")
    assert Query.of(tmp_path / "b.png").image == tmp_path / "b.png"
    assert Query.of(b"\xff\xd8").image == b"\xff\xd8"
    assert Query.of(img).image is img
    assert Query.of(7) == Query(id=7) and Query.of(np.int32(7)).id == 7
    assert Query.of(v).vector is v
    assert Query.of("a.jpg", box=BOX).box == tuple(float(b) for b in BOX)
    q = Query(id=3)
    assert Query.of(q) is q
    with pytest.raises(ConfigError, match="inside the Query"):
        Query.of(q, box=BOX)
    with pytest.raises(ConfigError, match="not a query"):
        Query.of(True)
    with pytest.raises(ConfigError, match="take no box"):
        Query.of(7, box=BOX)
    with pytest.raises(ConfigError, match="got nothing"):
        Query.of(None)  # type: ignore[arg-type]


def test_labels(tmp_path):
    assert Query(image="dir/a.jpg").label == "dir/a.jpg"
    assert Query(image=tmp_path / "b.png").label == str(tmp_path / "b.png")
    assert (
        Query(image=b"..").label == "<bytes>" and Query(image=bytearray(b"..")).label == "<bytes>"
    )
    assert Query(image=Image.new("RGB", (2, 2))).label == "<image>"
    assert Query(id=12).label == "id:12" and Query(vector=np.ones(3)).label == "<vector>"
    assert Query(image=b"..", name="upload.jpg").label == "upload.jpg"
    assert Query(id=12, name="mine").label == "mine"


def test_query_context_caches_per_query():
    q = Query(id=1)
    a, b = QueryContext(q, np.ones(3, np.float32)), QueryContext(q, np.ones(3, np.float32))
    a.cache["x"] = 1
    assert b.cache == {} and a.query is q
