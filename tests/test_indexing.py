"""The ``index`` stage (:mod:`lookalike.indexing`): index a folder or files, remove, relabel,
describe an index (the settings a run uses: tests/test_indexing_settings.py; resumed builds:
tests/test_resume.py).

With the real default model on small images; local features are SIFT (no weights to load).
The command line around these functions is tested in tests/test_cli.py.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import distinct_image, photo, write_images
from PIL import Image

from lookalike.errors import ConfigError, IndexStateError, LookalikeError
from lookalike.extract import Extractor
from lookalike.index import IndexConf, IndexStore
from lookalike.index.manifest import FORMAT_VERSION
from lookalike.indexing import (
    IndexReport,
    index_files,
    index_info,
    remove_images,
)
from lookalike.indexing.edit import path_forms
from lookalike.labels import labels_from_folder, labels_from_mapping
from lookalike.local.conf import VerifyConf
from lookalike.local.store import LocalFeatureStore
from lookalike.rerank.dba import DBA_NAME
from lookalike.search import Searcher

SIFT = VerifyConf(features="sift", max_keypoints=256, max_side=128)


def ids_by_name(index: Path) -> dict[str, int]:
    with IndexStore.open(index) as store:
        return {Path(r.path).name: r.id for r in store.records()}


def top_names(index: Path, queries: list, k: int = 1, rerank: tuple = ()) -> list[str]:
    with Searcher.open(index, list(rerank), device="cpu") as searcher:
        return [Path(a.hits[0].path).name for a in searcher.answer(queries, k)]


# -- index_folder / index_files ----------------------------------------------------------------


def jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def test_bad_files_are_recorded_and_odd_formats_indexed(tmp_path, build):
    folder = tmp_path / "mixed"
    folder.mkdir()
    distinct_image(0, 64).save(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    whole = jpeg_bytes(distinct_image(1, 64))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    distinct_image(2, 64).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    deep = np.asarray(distinct_image(3, 64).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    distinct_image(4, 64).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    upright = photo("astronaut", 96).crop((0, 0, 96, 64))  # landscape: rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # portrait pixels on disk
    (folder / "exif_rotated.jpg").write_bytes(jpeg_bytes(stored, exif=exif))
    (folder / "empty.jpg").write_bytes(b"")
    bad = {"corrupt.jpg", "truncated.jpg", "empty.jpg"}
    good = ["good.png", "cmyk.jpg", "deep16.png", "palette.png", "exif_rotated.jpg"]
    index = tmp_path / "index"

    report = build(folder, index)
    assert (report.added, report.updated, report.unchanged, len(report.failed)) == (5, 0, 0, 3)
    assert {Path(p).name for p, _ in report.failed} == bad and all(e for _, e in report.failed)
    assert report.to_dict()["failed"] == [{"path": p, "error": e} for p, e in report.failed]

    info = index_info(index)
    assert info["counts"] == {"ok": 5, "error": 3}
    assert {Path(f["path"]).name for f in info["failed"]} == bad
    assert {f["path"] for f in info["failed"]} == {str((folder / n).resolve()) for n in bad}

    with Searcher.open(index, device="cpu") as searcher:
        answers = searcher.answer([folder / n for n in good], k=1)
        for answer, name in zip(answers, good, strict=True):
            assert Path(answer.hits[0].path).name == name and answer.hits[0].score > 0.99
        # The EXIF-rotated file was indexed upright: the upright picture finds it.
        (hit,) = searcher.answer([upright], k=1)[0].hits
        assert Path(hit.path).name == "exif_rotated.jpg" and hit.score > 0.9
        # An indexed file that failed has no descriptor to search with.
        with pytest.raises(ConfigError, match="failed to index"):
            searcher.answer([info["failed"][0]["id"]])

    # A second run retries nothing that has not changed, failed files included.
    again = build(folder, index)
    assert (again.added, again.updated, again.unchanged, again.failed) == (0, 0, 8, [])


def test_changes_updates_and_vanished_files(tmp_path, make_images, build):
    paths = make_images(5)
    folder, index = paths[0].parent, tmp_path / "index"
    assert build(folder, index).added == 5
    before = ids_by_name(index)
    distinct_image(40, 64).save(paths[1])  # new content, new mtime
    stamp = os.stat(paths[1]).st_mtime + 10
    os.utime(paths[1], (stamp, stamp))
    paths[4].unlink()
    report = build(folder, index)
    assert (report.added, report.updated, report.unchanged, report.missing) == (0, 1, 3, 1)
    assert report.removed == 0 and report.relabelled is None
    assert ids_by_name(index) == before  # same ids; the vanished file is kept
    report = build(folder, index, remove_missing=True)
    assert (report.removed, report.missing, report.unchanged) == (1, 0, 4)
    assert set(ids_by_name(index)) == {p.name for p in paths[:4]}
    assert ids_by_name(index)[paths[1].name] == before[paths[1].name]
    assert top_names(index, [paths[1]]) == [paths[1].name]  # the new content is searched


def test_remove_missing_only_looks_under_the_folder(tmp_path, make_images, build):
    a = make_images(2, name="a")
    b = make_images(2, name="b")
    index = tmp_path / "index"
    build(a[0].parent, index)
    build(b[0].parent, index)
    report = build(a[0].parent, index, remove_missing=True)
    assert (report.removed, report.missing, report.unchanged) == (0, 0, 2)
    assert index_info(index)["counts"]["ok"] == 4


def test_index_files_takes_exactly_the_files_given(tmp_path, make_images, default_extractor):
    paths = make_images(4)
    index = tmp_path / "index"
    missing = tmp_path / "gone.png"
    report = index_files(
        [paths[0], paths[1], paths[0], Path(os.path.relpath(paths[1])), missing],
        index,
        default_extractor.conf,
        extractor=default_extractor,
    )
    assert (report.added, report.missing, report.removed) == (2, 0, 0)
    assert [Path(p).name for p, _ in report.failed] == ["gone.png"]
    assert sorted(ids_by_name(index)) == ["gone.png", "img000.png", "img001.png"]
    again = index_files(paths[2:], index, default_extractor.conf, extractor=default_extractor)
    assert (again.added, again.unchanged, again.missing) == (2, 0, 0)  # others left alone
    assert len(ids_by_name(index)) == 5
    with pytest.raises(LookalikeError, match="no image files"):
        index_files([], index, default_extractor.conf)


@pytest.mark.parametrize("structure", [IndexConf(backend="numpy"), IndexConf(factory="HNSW32")])
def test_a_rerun_keeps_the_structure_unless_another_is_asked_for(
    tmp_path, make_images, build, structure
):
    paths = make_images(3)
    index = tmp_path / "index"
    build(paths[0].parent, index, index_conf=structure)
    make_images(1, name="more")[0].rename(paths[0].parent / "new.png")
    report = build(paths[0].parent, index)  # no index_conf: the index's own
    assert (report.added, report.unchanged) == (1, 3)
    assert index_info(index)["index_conf"] == structure.to_dict()
    with pytest.raises(IndexStateError, match=r"index\.(backend|factory)="):
        build(paths[0].parent, index, index_conf=IndexConf())


def test_an_empty_folder_is_refused_before_an_index_is_made(tmp_path, build):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(LookalikeError, match="no images in"):
        build(tmp_path / "empty", tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_report_dict_rounds_the_timings():
    report = IndexReport(added=3, failed=[("/x.jpg", "empty file")], seconds=1.23456)
    d = report.to_dict()
    assert d["seconds"] == 1.235 and d["images_per_second"] == round(4 / 1.23456, 2)
    assert d["failed"] == [{"path": "/x.jpg", "error": "empty file"}]
    assert (d["added"], d["relabelled"], d["labelled"], d["classes"]) == (3, None, None, None)
    assert IndexReport().images_per_second == 0.0


# -- relabelling ------------------------------------------------------------------------------


def test_labels_label_new_images_and_relabel_indexed_ones_in_place(tmp_path, build):
    root = tmp_path / "photos"
    for sub in ("cats", "cups"):
        write_images(root / sub, 2)
    write_images(root, 1)  # directly in the folder: unlabelled
    index = tmp_path / "index"
    report = build(root, index, labels=labels_from_folder(root))
    assert (report.added, report.relabelled, report.labelled, report.classes) == (5, 0, 4, 2)
    # the images are unchanged: only the relabelling touches them
    mapping = {root / "cats" / "img000.png": "kitty", root / "img000.png": "misc"}
    report = build(root, index, labels=labels_from_mapping(mapping))
    assert (report.added, report.unchanged) == (0, 5)
    assert (report.relabelled, report.labelled, report.classes) == (5, 2, 2)
    with IndexStore.open(index) as store:
        labels = {Path(r.path).relative_to(root.resolve()).as_posix(): r.metadata for r in
                  store.records()}  # fmt: skip
    assert labels == {
        "cats/img000.png": {"label": "kitty"},
        "cats/img001.png": {},
        "cups/img000.png": {},
        "cups/img001.png": {},
        "img000.png": {"label": "misc"},
    }
    report = build(root, index)  # no labels: nothing relabelled, nothing reported
    assert (report.relabelled, report.labelled, report.classes) == (None, None, None)


def test_relabelling_a_sub_folder_keeps_the_labels_of_the_others(tmp_path, build):
    root = tmp_path / "photos"
    for sub in ("cats", "cups"):
        write_images(root / sub, 2)
    index = tmp_path / "index"
    build(root, index, labels=labels_from_folder(root))
    report = build(root / "cats", index, labels=labels_from_mapping({}))
    assert (report.unchanged, report.missing) == (2, 0)
    assert (report.relabelled, report.labelled, report.classes) == (2, 2, 1)
    with IndexStore.open(index) as store:
        labels = {"/".join(Path(r.path).parts[-2:]): r.metadata for r in store.records()}
    assert labels["cats/img000.png"] == labels["cats/img001.png"] == {}
    assert labels["cups/img000.png"] == labels["cups/img001.png"] == {"label": "cups"}


# -- remove_images ----------------------------------------------------------------------------


def test_remove_by_ids_and_by_paths_in_both_forms(tmp_path, make_images, build, monkeypatch):
    paths = make_images(5)
    folder, index = paths[0].parent, tmp_path / "index"
    build(folder, index)
    ids = ids_by_name(index)
    report = remove_images(index, ids=np.array([ids["img000.png"], ids["img000.png"], 9999]))
    assert (report.asked, report.removed) == (2, 1)
    assert report.to_dict() == {"asked": 2, "removed": 1}
    # absolute through a symlink (the index stores the resolved form) and relative
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(folder)
    report = remove_images(index, paths=[link / "img001.png", Path("img002.png"), "none.png"])
    assert (report.asked, report.removed) == (3, 2)
    assert sorted(ids_by_name(index)) == ["img003.png", "img004.png"]
    assert path_forms(link / "x.png") == [str(link / "x.png"), str(folder.resolve() / "x.png")]
    assert path_forms(folder.resolve() / "x.png") == [str(folder.resolve() / "x.png")]
    assert path_forms("x.png")[-1] == str(folder.resolve() / "x.png")  # against the cwd


@pytest.mark.parametrize("given", [{}, {"ids": [1], "paths": ["a.png"]}])
def test_remove_needs_ids_or_paths_not_both(small_index, given):
    with pytest.raises(ConfigError, match="either ids") as error:
        remove_images(small_index[1], **given)
    assert "\n" not in str(error.value)
    assert index_info(small_index[1])["counts"]["ok"] == 6  # nothing removed


def test_removal_brings_the_dba_and_the_local_features_in_step(tmp_path, make_images, build):
    paths = make_images(6)
    index = tmp_path / "index"
    report = build(paths[0].parent, index, local=SIFT)
    assert report.local_described == 6
    top_names(index, [paths[0]], rerank=("dba",))  # the first DBA search stores dba.npz
    assert index_info(index)["dba"]["k"] == 5
    ids = ids_by_name(index)
    remove_images(index, ids=[ids["img001.png"]])
    remove_images(index, paths=[paths[2]])
    live = sorted(i for name, i in ids.items() if name not in ("img001.png", "img002.png"))
    with np.load(index / DBA_NAME) as dba:
        assert dba["ids"].tolist() == live  # the stored DBA followed
    with LocalFeatureStore(index, "sift", create=False) as local:
        assert sorted(local.tags()) == live
    info = index_info(index)
    assert info["local"]["images"] == 4 and info["dba"]["bytes"] > 0
    assert top_names(index, [paths[3]], rerank=("dba", "verify")) == ["img003.png"]


# -- index_info -------------------------------------------------------------------------------


def test_info_describes_the_index(small_index, default_extractor):
    _, index = small_index
    info = index_info(index)
    conf = default_extractor.conf
    assert info["index"] == str(index.resolve())
    assert info["format_version"] == FORMAT_VERSION == 2
    assert info["descriptor"] == conf.descriptor()
    assert info["model"] == {
        "name": conf.model,
        "weights": None,
        "weights_hash": default_extractor.backbone.weights_id,
    }
    assert info["dim"] == default_extractor.dim
    assert info["index_conf"] == IndexConf().to_dict()
    backend = info["backend"]
    assert (backend["backend"], backend["structure"]) == ("faiss", "Flat")
    assert (backend["live"], backend["dead"], backend["trained"]) == (6, 0, True)
    assert backend["memory_bytes"] >= 6 * info["dim"] * 4
    assert info["query"] == {
        "rotations": list(conf.query_rotations),
        "rotation_penalty": conf.rotation_penalty,
        "crops": [],
        "crop_penalty": conf.crop_penalty,
    }
    assert info["whitening"]["learned"] is False  # 6 images are too few to learn one
    assert info["counts"] == {"ok": 6, "error": 0} and info["failed"] == []
    assert info["created"] <= info["updated"] and "lookalike" in info["versions"]
    assert info["local"] is None and info["dba"] is None


def test_info_of_local_features_dba_and_the_numpy_backend(tmp_path, make_images, build):
    paths = make_images(3)
    index = tmp_path / "index"
    build(paths[0].parent, index, index_conf=IndexConf(backend="numpy"), local=SIFT)
    info = index_info(index)
    assert (info["backend"]["backend"], info["backend"]["live"]) == ("numpy", 3)
    assert info["index_conf"]["backend"] == "numpy"
    local = info["local"]
    assert local["extractor"] == SIFT.feature_settings()
    assert local["images"] == 3 and local["bytes"] > 0 and local["recorded"] is True
    assert info["dba"] is None
    top_names(index, [paths[0]], rerank=("dba",))
    size = (index / DBA_NAME).stat().st_size
    assert index_info(index)["dba"] == {"k": 5, "alpha": 1.0, "bytes": size}


def test_info_of_features_cached_by_searches_is_not_recorded(tmp_path, make_images, build):
    paths = make_images(3)
    index = tmp_path / "index"
    build(paths[0].parent, index)
    with Searcher.open(index, ["verify"], SIFT, device="cpu") as searcher:
        searcher.answer([paths[0]], k=2)
    local = index_info(index)["local"]
    assert local["recorded"] is False and local["images"] == 3  # every candidate verified
    assert local["extractor"]["name"] == "sift"


def test_info_of_what_is_not_an_index(tmp_path):
    with pytest.raises(IndexStateError, match="does not exist"):
        index_info(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexStateError):
        index_info(tmp_path / "empty")


# -- failed links, retries, region samples ---------------------------------------------


def test_broken_and_looping_links_are_recorded_as_failed(tmp_path, make_images, build):
    paths = make_images(2)
    folder, index = paths[0].parent, tmp_path / "index"
    os.symlink(folder / "gone.png", folder / "broken.png")
    os.symlink("loop.png", folder / "loop.png")
    report = build(folder, index)
    assert report.added == 2
    reasons = {Path(p).name: e for p, e in report.failed}
    assert "broken symbolic link" in reasons["broken.png"]
    assert "symbolic link loop" in reasons["loop.png"]
    assert {Path(f["path"]).name for f in index_info(index)["failed"]} == set(reasons)
    again = build(folder, index)  # still failing: retried, and said again
    assert (again.unchanged, len(again.failed)) == (2, 2)
    (folder / "broken.png").unlink()
    distinct_image(7, 64).save(folder / "gone.png")  # the link's target appears
    os.symlink(folder / "gone.png", folder / "broken.png")
    fixed = build(folder, index)
    assert (fixed.added, fixed.updated, len(fixed.failed)) == (1, 1, 1)
    assert index_info(index)["counts"] == {"ok": 4, "error": 1}


def test_failed_files_are_retried_in_chunks_of_their_own(tmp_path, make_images, build, monkeypatch):
    """So the other files are chunked as in a build that never stopped."""
    paths = make_images(6)
    folder, index = paths[0].parent, tmp_path / "index"
    os.symlink(folder / "gone.png", folder / "img001x.png")
    build(folder, index, chunk=3)
    chunks: list[list[str]] = []
    real = Extractor.extract_files

    def recording(self, paths, want_regions=False, chunk=32):  # type: ignore[no-untyped-def]
        for decoded, desc in real(self, paths, want_regions, chunk):
            chunks.append([Path(d.path).name for d in decoded])
            yield decoded, desc

    monkeypatch.setattr(Extractor, "extract_files", recording)
    for p in paths[3:]:
        p.unlink()
    make_images(4, name="new")
    for p in sorted((tmp_path / "new").iterdir()):
        p.rename(folder / f"z{p.name}")
    report = build(folder, index, chunk=3)
    assert (report.added, len(report.failed)) == (4, 1)
    assert chunks == [["img001x.png"], ["zimg000.png", "zimg001.png", "zimg002.png"],
                      ["zimg003.png"]]  # fmt: skip


def test_region_samples_are_kept_until_the_whitening_is_learned(tmp_path, build):
    from lookalike.index.regions import REGIONS_NAME, RegionSamples

    folder, index = tmp_path / "images", tmp_path / "index"
    write_images(folder, 20, side=64)
    report = build(folder, index)  # 20 images: too few to learn one (min_images 32)
    assert not report.whitening_learned and (index / REGIONS_NAME).exists()
    with IndexStore.open(index) as store:
        hashes = [r.content_hash for r in store.records(status="ok")]
    with RegionSamples(index) as samples:
        assert all(samples.get(h) is not None for h in hashes)
    write_images(folder / "more", 12, side=72)
    report = build(folder, index)  # 32: learned from the samples of both runs
    assert report.whitening_learned and report.added == 12
    assert not (index / REGIONS_NAME).exists()
    assert index_info(index)["whitening"]["learned"] is True
