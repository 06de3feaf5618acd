"""A build killed at any point and resumed ends with the index an uninterrupted build makes:
the same stored vectors bit for bit, the same whitening, the same ranking for every image.

A small folder of real images (with a corrupt file and a broken link among them, so that
failures sit inside chunks) is indexed with the small test model in chunks of 4. The kill
points: inside the first chunk (its region samples committed, not its images), mid-way,
after the last chunk but before the whitening is learned, inside the whitening (before its
file is written, and after, before the checkpoint), and after it, before the samples are
deleted. In-process crashes (an exception at the point, which leaves the files as a kill
would) run in the default suite; real SIGKILLs of a subprocess are ``slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import write_images

from lookalike.errors import IndexStateError
from lookalike.extract import Extractor
from lookalike.index import IndexStore
from lookalike.index.regions import REGIONS_NAME, RegionSamples, remove_samples, sample_regions
from lookalike.indexing import index_folder

pytest_plugins = ("_fixtures",)

N_IMAGES = 36  # above the whitening's min_images (32)
CHUNK = 4  # files per commit: 10 chunks
TESTS = Path(__file__).resolve().parent
POINTS = {  # kill point -> (what is interrupted, at which call)
    "first chunk": ("add", 1),
    "mid-way": ("add", 5),
    "before the whitening": ("learn", 1),
    "writing the whitening": ("save whitening", 1),
    "checkpoint of the whitening": ("checkpoint", 1),
    "deleting the samples": ("remove samples", 1),
}


class Crash(BaseException):
    """Stands for a kill in-process (a BaseException: nothing on the way catches it)."""


def install_kill(
    where: str, nth: int, kill: Callable[[], None], patch: Callable[..., None] = setattr
) -> None:
    """Call ``kill()`` at the ``nth`` call of the step ``where`` (see :data:`POINTS`), before
    the step does its work; ``patch`` is ``setattr`` or ``monkeypatch.setattr``. Used
    in-process and by the subprocess of the slow tests."""
    import lookalike.indexing.learn as learn

    owners = {
        "add": (IndexStore, "add"),
        "learn": (learn, "learn_whitening"),
        "save whitening": (np, "savez"),  # the whitening file: the only .npz a build writes
        "checkpoint": (IndexStore, "_write_checkpoint"),
        "remove samples": (learn, "remove_samples"),
    }
    owner, name = owners[where]
    real, calls = getattr(owner, name), [0]

    def step(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == nth:
            kill()
        return real(*args, **kwargs)

    patch(owner, name, step)


def raise_crash() -> None:
    raise Crash


def make_folder(base: Path) -> Path:
    folder = base / "images"
    write_images(folder, N_IMAGES, side=96)
    (folder / "img005x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # a bad PNG
    os.symlink(folder / "gone.png", folder / "img013x.png")  # failed, retried by every run
    return folder


def snapshot(index: Path) -> dict[str, object]:
    """What must come out the same: records, raw vectors (bytes), the whitening (bytes), the
    full ranking of every image as a query (ids and score bytes)."""
    with IndexStore.open(index) as store:
        records = [(r.id, r.path, r.status, r.content_hash) for r in store.records()]
        ok = [r.id for r in store.records(status="ok")]
        vectors = store.vectors(ok)
        whitening = store.whitening
        scores, ids = store.search(vectors, 0)
    assert whitening is not None
    return {
        "records": records,
        "vectors": vectors.tobytes(),
        "whitening": (whitening.mean.tobytes(), whitening.projection.tobytes()),
        "ranking ids": ids.tobytes(),
        "ranking scores": scores.tobytes(),
    }


def assert_same(resumed: dict[str, object], clean: dict[str, object]) -> None:
    for key in clean:
        assert resumed[key] == clean[key], f"{key} differ from the clean build's"


@pytest.fixture(scope="module")
def extractor(make_extractor: Callable[..., Extractor]) -> Extractor:
    return make_extractor()


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, extractor: Extractor):
    """``(folder, snapshot)`` of an uninterrupted build."""
    base = tmp_path_factory.mktemp("resume")
    folder = make_folder(base)
    report = index_folder(folder, base / "clean", extractor.conf, extractor=extractor, chunk=CHUNK)
    assert report.whitening_learned and report.added == N_IMAGES and len(report.failed) == 2
    assert not (base / "clean" / REGIONS_NAME).exists()
    return folder, snapshot(base / "clean")


def build(folder: Path, index: Path, extractor: Extractor):
    return index_folder(folder, index, extractor.conf, extractor=extractor, chunk=CHUNK)


def test_two_clean_builds_are_identical(clean, extractor, tmp_path) -> None:
    folder, expected = clean
    build(folder, tmp_path / "again", extractor)
    assert_same(snapshot(tmp_path / "again"), expected)


def crashed_then_resumed(folder: Path, index: Path, extractor: Extractor, points: list[str]):
    """Build, crashing at each of ``points`` in turn (one per run), then run to completion;
    returns the last run's report."""
    for point in points:
        with pytest.MonkeyPatch.context() as mp:
            install_kill(*POINTS[point], raise_crash, mp.setattr)
            with pytest.raises(Crash):
                build(folder, index, extractor)
    return build(folder, index, extractor)


LEARNED_BEFORE = ("checkpoint of the whitening", "deleting the samples")  # npz written


@pytest.mark.parametrize(
    "points",
    [[point] for point in POINTS]
    + [
        ["first chunk", "mid-way", "before the whitening"],
        ["writing the whitening", "checkpoint of the whitening"],
    ],
    ids=lambda points: ", ".join(points),
)
def test_a_crashed_build_resumed_is_the_clean_build(clean, extractor, tmp_path, points) -> None:
    folder, expected = clean
    index = tmp_path / "index"
    report = crashed_then_resumed(folder, index, extractor, points)
    assert report.whitening_learned is (points[-1] not in LEARNED_BEFORE)
    assert_same(snapshot(index), expected)
    assert not (index / REGIONS_NAME).exists()


def test_samples_of_uncommitted_images_are_dropped(clean, extractor, tmp_path) -> None:
    """A crash between the two commits of a chunk leaves samples no image carries: the next
    run deletes them before it adds its own."""
    folder, _ = clean
    index = tmp_path / "index"
    with pytest.MonkeyPatch.context() as mp:
        install_kill(*POINTS["mid-way"], raise_crash, mp.setattr)
        with pytest.raises(Crash):
            build(folder, index, extractor)
    with IndexStore.open(index) as store:
        committed = {r.content_hash for r in store.records(status="ok")}
    assert len(committed) == 4 * CHUNK - 2  # four chunks, the two failures among them
    with RegionSamples(index) as samples:
        stored = samples.total
        assert all(samples.get(h) is not None for h in committed)
    with RegionSamples(index) as samples:
        assert samples.retain(committed) == CHUNK  # the fifth chunk's, never committed
        assert samples.total < stored


def test_checkpoints_fall_where_an_uninterrupted_build_makes_them(
    clean, extractor, tmp_path, monkeypatch
) -> None:
    """At fixed sizes of the collection (a structure trained at a checkpoint is trained on the
    same vectors), not every so many files of each run."""
    import lookalike.indexing.folder as folder_module

    folder, _ = clean
    monkeypatch.setattr(folder_module, "CHECKPOINT_EVERY", 10)
    sizes: list[int] = []
    real = IndexStore.checkpoint

    def counting(self: IndexStore) -> None:
        sizes.append(sum(self.count().values()))
        real(self)

    monkeypatch.setattr(IndexStore, "checkpoint", counting)
    build(folder, tmp_path / "clean", extractor)
    clean_sizes, sizes[:] = list(sizes), []
    assert clean_sizes == [12, 20, 32]  # chunks of 4: the first past 10, 20, 30
    crashed_then_resumed(folder, tmp_path / "index", extractor, ["first chunk", "mid-way"])
    assert sizes == clean_sizes


# -- the sample store ---------------------------------------------------------------------


def test_sample_regions_depends_on_the_image_alone() -> None:
    regions = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float16)
    a = sample_regions(regions, "ab" * 16, per_image=10)
    assert a.shape == (10, 8) and a.dtype == np.float16
    assert np.array_equal(a, sample_regions(regions.copy(), "ab" * 16, per_image=10))
    assert not np.array_equal(a, sample_regions(regions, "cd" * 16, per_image=10))
    rows = {r.tobytes() for r in regions}
    assert all(r.tobytes() in rows for r in a)  # rows of the image, in their order
    few = regions[:3]
    assert np.array_equal(sample_regions(few, "ab" * 16, per_image=10), few)  # all kept
    assert sample_regions(regions[:0], "ab" * 16).shape == (0, 8)


def test_region_samples_store(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    with RegionSamples(tmp_path) as samples:
        assert samples.total == 0 and samples.get("h1") is None
        samples.put([("h1", x), ("h2", x[:1])])
        samples.put([("h1", x[:2])])  # a content keeps its first sample
        samples.put([])
        assert samples.total == 4
        assert np.array_equal(samples.get("h1"), x) and samples.get("h1").dtype == np.float16
    with RegionSamples(tmp_path) as samples:  # committed: another opening sees them
        assert samples.total == 4
        assert samples.retain(["h2", "other"]) == 1
        assert samples.total == 1 and samples.get("h1") is None
    assert remove_samples(tmp_path) and not (tmp_path / REGIONS_NAME).exists()
    assert not remove_samples(tmp_path)


def test_a_damaged_sample_store_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / REGIONS_NAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(IndexStateError, match=r"regions\.sqlite.*delete it") as error:
        RegionSamples(tmp_path)
    assert "\n" not in str(error.value)


# -- real SIGKILLs -------------------------------------------------------------------------

CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from _fixtures import TEST_CONF
import psutil
from test_resume import CHUNK, POINTS, install_kill
from lookalike.indexing import index_folder

def kill():
    print(*(c.pid for c in psutil.Process().children()), flush=True)  # what must die with it
    os.kill(os.getpid(), signal.SIGKILL)

folder, index, point = sys.argv[2:5]
if point:
    install_kill(*POINTS[point], kill)
index_folder(folder, index, TEST_CONF.replace(workers=1), chunk=CHUNK)
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_child(folder: Path, index: Path, point: str) -> tuple[int, str, str]:
    """``(returncode, stdout, stderr)`` of one indexing process. Its output goes to files,
    not pipes, which a worker outliving it would keep open."""
    out, err = index.with_suffix(".out"), index.with_suffix(".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        cmd = [sys.executable, "-c", CHILD, str(TESTS), str(folder), str(index), point]
        returncode = subprocess.call(cmd, stdout=stdout, stderr=stderr, timeout=300)
    return returncode, out.read_text(), err.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "points",
    [[point] for point in POINTS] + [["first chunk", "mid-way", "before the whitening"]],
    ids=lambda points: ", ".join(points),
)
def test_a_sigkilled_build_resumed_is_the_clean_build(clean, tmp_path, points) -> None:
    """Killed by SIGKILL (decoding in a worker process) at each point, then run to the end
    in another process: the index is the in-process clean build's, and nothing the killed
    process started outlives it."""
    folder, expected = clean
    index = tmp_path / "index"
    for point in points:
        returncode, stdout, stderr = run_child(folder, index, point)
        assert returncode == -signal.SIGKILL, stderr
        started = [int(pid) for pid in stdout.split()]
        assert started  # the decoder worker (and multiprocessing's resource tracker)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in started if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, "processes outlived the killed indexer"
    returncode, _, stderr = run_child(folder, index, "")
    assert returncode == 0, stderr
    assert_same(snapshot(index), expected)
    assert not (index / REGIONS_NAME).exists()
