"""The Ray engine (:mod:`lookalike.indexing.ray_engine`) builds the index the local engine
builds, and a Ray job SIGKILLed after a commit resumes to it.

One local Ray (``ray.init(num_cpus=2)``) serves the module: Ray takes seconds to start. A
folder of real images with a corrupt file and a broken link (failures inside chunks) and a
file name that is not UTF-8 is indexed with the small test model in chunks of 4, in Ray
batches of 3 (batches straddle the chunks, and two actors may finish them out of order).
The settings, the placement of the actors and the CLI's options are checked without Ray.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images

from lookalike.cli import main
from lookalike.cli.index_commands import ENGINE_CHOICES
from lookalike.errors import ConfigError
from lookalike.extract import ExtractConf, Extractor
from lookalike.index import IndexStore
from lookalike.indexing import index_folder
from lookalike.indexing.ray_engine import (
    ENGINES,
    RayConf,
    check_engine,
    describe_files,
    placement,
    require_ray,
)

pytest_plugins = ("_fixtures",)

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="the Ray engine needs ray[data]: pip install 'lookalike[ray]'",
)

N_IMAGES = 34  # above the whitening's min_images (32), with the 2 failures: 36 files
CHUNK = 4  # files per commit: 9 chunks
BATCH = 3  # files per Ray batch: batches straddle the chunks
TWO_ACTORS = RayConf(actors=2, batch_size=BATCH, cpus_per_actor=1)


def make_folder(base: Path) -> Path:
    folder = base / "images"
    write_images(folder, N_IMAGES, side=96)
    os.rename(folder / "img020.png", os.fsdecode(bytes(folder) + b"/img020\xff.png"))  # not UTF-8
    (folder / "img005x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # a bad PNG
    os.symlink(folder / "gone.png", folder / "img013x.png")  # failed, retried by every run
    return folder


def contents(index: Path) -> dict[str, object]:
    """Records (ids, paths, hashes, sizes, errors), raw vectors, whitening, the top 5 of
    every image as a query."""
    with IndexStore.open(index) as store:
        records = list(store.records())
        ok = [r.id for r in store.records(status="ok")]
        vectors = store.vectors(ok)
        whitening = store.whitening
        _, top = store.search(vectors, 5)
    return {"records": records, "vectors": vectors, "whitening": whitening, "top": top}


def assert_same_index(got: dict[str, object], expected: dict[str, object]) -> None:
    assert got["records"] == expected["records"]
    a, b = (np.asarray(c["vectors"], np.float64) for c in (got, expected))
    cosines = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosines.min() > 0.9999, f"descriptors differ: min cosine {cosines.min()}"
    assert got["whitening"] is not None and expected["whitening"] is not None
    np.testing.assert_allclose(
        got["whitening"].projection, expected["whitening"].projection, atol=1e-4
    )
    np.testing.assert_array_equal(got["top"], expected["top"])


@pytest.fixture(scope="module")
def extractor(make_extractor: Callable[..., Extractor]) -> Extractor:
    return make_extractor()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, extractor: Extractor):
    """``(folder, contents)`` of the local engine's build."""
    base = tmp_path_factory.mktemp("ray-engine")
    folder = make_folder(base)
    report = index_folder(folder, base / "local", extractor.conf, extractor=extractor, chunk=CHUNK)
    assert report.whitening_learned and report.added == N_IMAGES and len(report.failed) == 2
    return folder, contents(base / "local")


@pytest.fixture(scope="module")
def ray_cluster(lookalike_cache: Path) -> Iterator[str]:
    """A local Ray for the module (after ``$LOOKALIKE_CACHE`` is set: its workers inherit
    it, so the actors load the graph the session exported); its GCS address."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# -- against the local engine --------------------------------------------------------------------


@needs_ray
def test_the_ray_engine_builds_the_index_of_the_local_engine(
    ray_cluster, local, extractor, tmp_path
):
    folder, expected = local
    report = index_folder(
        folder, tmp_path / "ray", extractor.conf, chunk=CHUNK, engine="ray", ray=TWO_ACTORS
    )
    assert (report.added, len(report.failed), report.whitening_learned) == (N_IMAGES, 2, True)
    assert_same_index(contents(tmp_path / "ray"), expected)
    again = index_folder(folder, tmp_path / "ray", chunk=CHUNK, engine="ray", ray=TWO_ACTORS)
    # the broken link is retried (on Ray), the bad PNG is unchanged
    assert (again.added, again.updated, again.unchanged) == (0, 0, N_IMAGES + 1)
    assert [Path(path).name for path, _ in again.failed] == ["img013x.png"]


@needs_ray
def test_the_cli_runs_the_ray_engine(ray_cluster, local, extractor, tmp_path, capsys):
    folder, expected = local
    index = tmp_path / "cli"
    rc = main(
        [str(a) for a in ("index", folder, "--index", index, "--engine", "ray", "--actors", 1,
                          "--batch-size", BATCH, "--chunk", CHUNK, "--image-size", 128,
                          "--device", "cpu", "-q", "--json")]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    # the test model's settings but for the batch size (4 there) and the rotations (query only)
    with IndexStore.open(index) as store:
        assert store.manifest.descriptor == extractor.conf.descriptor()
    assert_same_index(contents(index), expected)
    assert '"added": 34' in out


@needs_ray
def test_what_an_actor_cannot_do_is_reported_as_the_project_error(ray_cluster, local, tmp_path):
    folder, _ = local
    conf = ExtractConf(image_size=128, weights=str(tmp_path / "gone.pth"), workers=0)
    files = sorted(folder.glob("img00[0-4].png"))
    with pytest.raises(ConfigError, match=r"gone\.pth does not exist"):
        list(describe_files(conf, [files], False, CHUNK, RayConf(actors=1), print))


# -- an interrupted job ------------------------------------------------------------------------

CHILD = """
import os, signal, sys
from lookalike.extract import ExtractConf
from lookalike.index import IndexStore
from lookalike.indexing import index_folder
from lookalike.indexing.ray_engine import RayConf

folder, index, address = sys.argv[1:]
real, calls = IndexStore.add, [0]

def add(*args, **kwargs):  # SIGKILLed before the second commit: the first one is on disk
    calls[0] += 1
    if calls[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

IndexStore.add = add
conf = ExtractConf(**{conf})
index_folder(folder, index, conf, chunk={chunk}, engine="ray",
             ray=RayConf(address=address, actors=2, batch_size={batch}, cpus_per_actor=1))
"""


@needs_ray
def test_a_killed_ray_job_resumes_to_the_index_of_the_local_engine(
    ray_cluster, local, extractor, tmp_path
):
    folder, expected = local
    index = tmp_path / "killed"
    fields = {"image_size": 128, "workers": 0, "device": "cpu", "batch_size": 4}
    assert ExtractConf(**fields).descriptor() == extractor.conf.descriptor()
    script = CHILD.format(conf=fields, chunk=CHUNK, batch=BATCH)
    # the child drives its own job on the module's cluster (its actors die with it)
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(index), ray_cluster],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    with IndexStore.open(index) as store:
        assert sum(store.count().values()) == CHUNK  # the first chunk only
        assert store.whitening is None
    report = index_folder(folder, index, chunk=CHUNK, engine="ray", ray=TWO_ACTORS)
    assert report.unchanged == CHUNK and report.whitening_learned
    assert report.added + len(report.failed) + report.unchanged == N_IMAGES + 2
    got = contents(index)
    paths = [r.path for r in got["records"]]
    assert len(paths) == len(set(paths)) == N_IMAGES + 2  # exactly one record per file
    assert_same_index(got, expected)


# -- settings, placement, options (no Ray needed) ------------------------------------------------


def test_the_engine_is_checked():
    assert check_engine("local", None) is None
    with pytest.raises(ConfigError, match="valid: local, ray"):
        check_engine("spark", None)
    with pytest.raises(ConfigError, match="engine='ray'"):
        check_engine("local", RayConf())
    assert ENGINE_CHOICES == ENGINES


@needs_ray
def test_the_ray_engine_defaults_to_the_default_settings():
    assert check_engine("ray", None) == RayConf()
    assert check_engine("ray", TWO_ACTORS) is TWO_ACTORS


@pytest.mark.parametrize(
    "changes",
    [{"actors": 0}, {"batch_size": 0}, {"cpus_per_actor": 0}, {"gpus_per_actor": -1}],
)
def test_bad_ray_settings_are_refused(changes):
    with pytest.raises(ConfigError):
        RayConf(**changes)


def test_without_ray_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lookalike\[ray\]'"):
        require_ray()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    write_images(tmp_path / "images", 1)
    with pytest.raises(ConfigError, match=r"pip install 'lookalike\[ray\]'"):
        index_folder(tmp_path / "images", tmp_path / "index", engine="ray")
    assert not (tmp_path / "index").exists()  # refused before the index is made


CPU_ONLY = {"CPU": 8.0}
WITH_GPUS = {"CPU": 16.0, "GPU": 2.0}


@pytest.mark.parametrize(
    ("device", "ray", "resources", "expected"),
    [
        ("auto", RayConf(), CPU_ONLY, (8, 1.0, 0.0, "cpu", 1)),
        ("cpu", RayConf(cpus_per_actor=2), CPU_ONLY, (4, 2.0, 0.0, "cpu", 2)),
        ("auto", RayConf(actors=3), CPU_ONLY, (3, 1.0, 0.0, "cpu", 1)),
        ("auto", RayConf(), WITH_GPUS, (2, 1.0, 1.0, "cuda", None)),
        ("cuda", RayConf(gpus_per_actor=0.5), WITH_GPUS, (4, 1.0, 0.5, "cuda", None)),
        ("cpu", RayConf(), WITH_GPUS, (16, 1.0, 0.0, "cpu", 1)),
        ("auto", RayConf(gpus_per_actor=0), WITH_GPUS, (16, 1.0, 0.0, "cpu", 1)),
    ],
)
def test_actors_are_placed_on_what_the_cluster_has(device, ray, resources, expected):
    where = placement(ExtractConf(device=device), ray, resources)
    got = (where["actors"], where["num_cpus"], where["num_gpus"], where["conf"].device)
    assert (*got, where["threads"]) == expected
    assert where["conf"].descriptor() == ExtractConf().descriptor()


@pytest.mark.parametrize(
    ("device", "ray", "match"),
    [("cuda", RayConf(), "1 GPU each but the cluster has 0"),
     ("cpu", RayConf(cpus_per_actor=16), "16 CPUs each but the cluster has 8")],
)  # fmt: skip
def test_actors_the_cluster_cannot_hold_are_refused(device, ray, match):
    with pytest.raises(ConfigError, match=match):
        placement(ExtractConf(device=device), ray, CPU_ONLY)


@pytest.mark.parametrize(
    "option", [("--actors", "2"), ("--batch-size", "8"), ("--ray-address", "auto")]
)
def test_ray_options_need_the_ray_engine(option, tmp_path, capsys):
    write_images(tmp_path / "images", 1)
    rc = main(["index", str(tmp_path / "images"), "--index", str(tmp_path / "index"), *option])
    assert rc == 2
    assert f"{option[0]} apply to the Ray engine: add --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()
