"""Which settings an indexing run uses (:mod:`lookalike.indexing.settings`): the index's
own unless others are asked for; other descriptor settings refused naming each difference,
other query-time settings recorded as the index's search defaults.

With the real default model on small images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import write_images

from lookalike.errors import ConfigError, IndexStateError
from lookalike.extract import get_preset
from lookalike.index import INDEX_PRESETS, IndexConf, IndexStore
from lookalike.indexing import FROM_INDEX, index_folder, index_info, resolve_settings
from lookalike.search import Searcher

# -- resolve_settings -------------------------------------------------------------------------


def test_a_new_index_gets_the_preset_and_options(tmp_path):
    s = resolve_settings(tmp_path / "new")
    assert (s.preset, s.extract, s.index) == ("default", get_preset("default"), IndexConf())
    assert resolve_settings(None).extract == get_preset("default")
    s = resolve_settings(None, "fast", image_size=256, pooling="mac", device="cpu", workers=0)
    assert s.preset == "fast"
    assert s.extract == get_preset("fast").replace(
        image_size=256, pooling="mac", device="cpu", workers=0
    )
    weights = tmp_path / "w.pth"
    s = resolve_settings(None, model="resnet50", weights=Path(os.path.relpath(weights)))
    assert s.preset == "default"  # an option alone starts from the default preset
    assert (s.extract.model, s.extract.weights) == ("resnet50", str(weights.resolve()))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"factory": "HNSW32"}, IndexConf(factory="HNSW32")),
        ({"index_preset": "ivfpq"}, INDEX_PRESETS["ivfpq"]),
        ({"backend": "numpy"}, IndexConf(backend="numpy")),
        ({"index_preset": "hnsw", "backend": "faiss"}, INDEX_PRESETS["hnsw"]),
        ({"index_preset": "numpy"}, IndexConf(backend="numpy")),
    ],
)
def test_the_structure_of_a_new_index(tmp_path, options, expected):
    assert resolve_settings(tmp_path / "new", **options).index == expected


def test_bad_names_are_refused():
    with pytest.raises(ConfigError, match="preset 'nope'"):
        resolve_settings(None, "nope")
    with pytest.raises(ConfigError, match="'nope'"):
        resolve_settings(None, index_preset="nope")
    with pytest.raises(ConfigError, match="faiss, numpy"):
        resolve_settings(None, backend="annoy")
    with pytest.raises(ConfigError, match="image_size"):
        resolve_settings(None, image_size=8)


def test_an_existing_index_keeps_its_own_settings(tmp_path, make_images, default_extractor):
    paths = make_images(3)
    index = tmp_path / "index"
    conf = default_extractor.conf.replace(query_rotations=(0, 180), rotation_penalty=0.1)
    index_folder(
        paths[0].parent, index, conf, IndexConf(factory="HNSW32"), extractor=default_extractor
    )
    s = resolve_settings(index, device="cpu", workers=0)  # run-time options only
    assert s.preset == FROM_INDEX
    assert s.extract.descriptor() == conf.descriptor()
    assert (s.extract.query_rotations, s.extract.rotation_penalty) == ((0, 180), 0.1)
    assert (s.extract.device, s.extract.workers) == ("cpu", 0)
    assert s.index == IndexConf(factory="HNSW32")
    report = index_folder(paths[0].parent, index, s.extract, s.index)  # a rerun: accepted
    assert (report.unchanged, report.added) == (3, 0)
    # asked for explicitly, other settings are what the run uses (and the index refuses)
    assert resolve_settings(index, "fast").extract == get_preset("fast")
    assert resolve_settings(index, index_preset="exact").index == IndexConf()


def differing(a: dict, b: dict) -> list[str]:
    """The keys the message must name: nested ones where both sides hold a dict, the whole
    setting where one side does not (``whitening=null`` against a dict)."""
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{key}.{k}" for k in sorted(x.keys() | y.keys()) if x.get(k) != y.get(k)]
        elif x != y:
            out.append(key)
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"pooling": "gem"},
        {"preset": "fast"},
        {"image_size": 256},
        {"factory": "HNSW32"},
        {"backend": "numpy"},
        {"preset": "naive", "index_preset": "hnsw"},
    ],
)
def test_other_descriptor_settings_are_refused_naming_every_difference(small_index, options):
    folder, index = small_index
    s = resolve_settings(index, **options)
    with IndexStore.open(index) as store:
        built, structure = store.manifest.descriptor, store.manifest.index
    named = differing(built, s.extract.descriptor())
    named += [
        f"index.{k}" for k in ("backend", "factory") if getattr(s.index, k) != getattr(structure, k)
    ]
    assert named  # the test compares something
    with pytest.raises(IndexStateError) as error:
        index_folder(folder, index, s.extract, s.index)
    message = str(error.value)
    assert all(f"{key}=" in message for key in named), (named, message)
    assert "\n" not in message and "new --index directory" in message
    assert index_info(index)["counts"]["ok"] == 6  # nothing changed


def test_a_run_given_no_settings_uses_the_index_own(tmp_path: Path) -> None:
    """``index_folder(dir, index)`` is ``lookalike index DIR --index ...`` without options:
    an index built with another preset is synced, not refused; a new one is ``default``."""
    from lookalike.indexing import index_files

    folder = tmp_path / "images"
    write_images(folder, 3, side=64)
    fast = get_preset("fast").replace(workers=0)
    index_folder(folder, tmp_path / "index", fast)
    write_images(folder / "more", 2, side=72)
    report = index_folder(folder, tmp_path / "index")
    assert (report.added, report.unchanged) == (2, 3)
    extra = write_images(tmp_path / "extra", 1, side=80)
    assert index_files(extra, tmp_path / "index").added == 1
    with IndexStore.open(tmp_path / "index") as store:
        assert store.manifest.descriptor == fast.descriptor() and len(store) == 6
    assert not (tmp_path / "index" / "regions.sqlite").exists()  # no whitening: no samples
    assert resolve_settings(tmp_path / "new").extract == get_preset("default")


# -- query defaults -----------------------------------------------------------------------


def test_other_query_settings_become_the_index_defaults(
    tmp_path, make_images, build, default_extractor
):
    """``index --preset upright`` on a ``default`` index: the rotations are query-time
    settings, so they are recorded (and said), not ignored; no settings change nothing."""
    from lookalike.index.manifest import QueryDefaults

    paths = make_images(3)
    folder, index = paths[0].parent, tmp_path / "index"
    assert build(folder, index).query_defaults_changed is False  # a new index records them
    with IndexStore.open(index) as store:
        assert store.manifest.query == QueryDefaults((0, 90, 270), 0.05)
    upright = get_preset("upright").replace(workers=0)
    report = index_folder(folder, index, upright)
    assert report.query_defaults_changed is True and report.unchanged == 3
    assert report.to_dict()["query_defaults_changed"] is True
    assert index_info(index)["query"] == {
        "rotations": [0],
        "rotation_penalty": 0.05,
        "crops": [],
        "crop_penalty": 0.05,
    }
    assert index_folder(folder, index, upright).query_defaults_changed is False
    # given no settings, or only an extractor, the index keeps its own
    assert index_folder(folder, index).query_defaults_changed is False
    report = index_folder(folder, index, extractor=default_extractor)
    assert report.query_defaults_changed is False
    assert index_info(index)["query"]["rotations"] == [0]
    with Searcher.open(index, device="cpu") as searcher:  # searches use them
        assert searcher.extractor.conf.query_rotations == (0,)
