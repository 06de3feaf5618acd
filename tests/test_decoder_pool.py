"""Decoding many files (:func:`lookalike.images.decode_many`, its worker processes in
:mod:`lookalike.decoder_pool`): input order, bad files as errors, dying workers, early
close, and workers that die with a SIGKILLed parent."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_images import RED, encode, halves, noisy_jpeg, write

from lookalike import images
from lookalike.errors import ConfigError
from lookalike.images import Decoded, decode_many, file_hash

_REAL_DECODE_CHUNK = images._decode_chunk


# --- decode_many --------------------------------------------------------------------------


@pytest.fixture
def mixed_files(tmp_path: Path) -> list[Path]:
    good = [
        write(tmp_path / "a.jpg", encode(halves(300, 100), "JPEG", quality=90)),
        write(tmp_path / "b.png", encode(halves(40, 80), "PNG")),
        write(tmp_path / "c.gif", encode(halves(10, 10), "GIF")),
    ]
    data = noisy_jpeg(200, 200)
    bad = [
        write(tmp_path / "cut.jpg", data[: len(data) // 2]),
        write(tmp_path / "empty.png", b""),
        tmp_path / "missing.jpg",
        write(tmp_path / "junk.webp", b"garbage"),
    ]
    return [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[0]]


def _summary(d: Decoded) -> tuple:
    shape = None if d.image is None else d.image.shape
    return d.index, d.path, shape, d.width, d.height, d.size, d.mtime, d.content_hash, d.error


def test_decode_many_inline(mixed_files: list[Path]) -> None:
    out = list(decode_many(mixed_files, max_side=64, workers=0))
    assert [d.index for d in out] == list(range(len(mixed_files)))
    assert [d.path for d in out] == [str(p) for p in mixed_files]
    ok = [d.error is None for d in out]
    assert ok == [True, False, True, False, False, True, False, True]
    first = out[0]
    data = mixed_files[0].read_bytes()
    assert first.content_hash == file_hash(data) and first.size == len(data)
    assert first.mtime == mixed_files[0].stat().st_mtime
    assert (first.width, first.height) == (300, 100)
    assert first.image is not None and first.image.shape == (21, 64, 3)
    assert first.image.dtype == np.uint8
    assert np.abs(first.image[10, 5].astype(int) - RED).max() <= 12
    assert out[2].image is not None and out[2].image.shape == (64, 32, 3)
    assert "cut.jpg" in out[1].error and out[1].size == mixed_files[1].stat().st_size
    assert out[1].image is None and out[1].width is None and out[1].content_hash is not None
    assert "0 bytes" in out[3].error and out[3].size == 0
    assert "does not exist" in out[4].error and out[4].size is None
    assert "junk.webp" in out[6].error
    assert all("\n" not in d.error for d in out if d.error)


def test_decode_many_workers_match_inline(mixed_files: list[Path]) -> None:
    inline = list(decode_many(mixed_files, max_side=64, workers=0))
    pooled = list(decode_many(mixed_files, max_side=64, workers=2, chunksize=1))
    assert [_summary(d) for d in pooled] == [_summary(d) for d in inline]
    for a, b in zip(inline, pooled, strict=True):
        assert (a.image is None and b.image is None) or np.array_equal(a.image, b.image)


def test_decode_many_empty_and_bad_args() -> None:
    assert list(decode_many([], max_side=64, workers=0)) == []
    assert list(decode_many([], max_side=64, workers=2)) == []
    with pytest.raises(ConfigError, match="workers"):
        decode_many([], max_side=64, workers=-1)
    with pytest.raises(ConfigError, match="chunksize"):
        decode_many([], max_side=64, chunksize=0)


def test_decode_many_closed_early_does_not_hang(tmp_path: Path) -> None:
    path = write(tmp_path / "n.jpg", noisy_jpeg(400, 300))
    gen = decode_many([path] * 200, max_side=32, workers=2, chunksize=2)
    assert next(gen).index == 0 and next(gen).index == 1
    closer = threading.Thread(target=gen.close)
    closer.start()
    closer.join(timeout=60)
    assert not closer.is_alive()
    assert multiprocessing.active_children() == []


def _crashing_decode_chunk(
    items: list[tuple[int, str]], max_side: int | None, upscale: bool
) -> list:
    """Stand-in worker that dies (as a segfaulting decoder would) on files named crash*."""
    if any(Path(p).name.startswith("crash") for _, p in items):
        os._exit(3)
    return _REAL_DECODE_CHUNK(items, max_side, upscale)


def test_decode_many_survives_a_dying_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write(tmp_path / "ok.png", encode(halves(), "PNG"))
    crash = write(tmp_path / "crash.png", encode(halves(), "PNG"))
    paths = [good, good, crash, good, good, good, good]
    monkeypatch.setattr(images, "_decode_chunk", _crashing_decode_chunk)
    out = list(decode_many(paths, max_side=16, workers=2, chunksize=2))
    assert [d.index for d in out] == list(range(len(paths)))
    assert [d.error is None for d in out] == [True, True, False, True, True, True, True]
    assert "crash.png crashed the decoder process" in out[2].error
    assert all(d.image is not None and d.image.shape == (8, 16, 3) for d in out if not d.error)


def test_decode_many_reports_workers_that_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spawned workers re-run the main script; when that fails, say so instead of blaming files."""
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", str(tmp_path / "gone.py"), raising=False)
    good = write(tmp_path / "ok.png", encode(halves(), "PNG"))
    with pytest.raises(ConfigError, match=r"cannot start.*workers=0"):
        list(decode_many([good] * 3, max_side=16, workers=1))


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_DECODING_CHILD = """
import sys, time
from lookalike.images import decode_many
stream = decode_many(sys.argv[1:], max_side=32, workers=2, chunksize=1)
next(stream)
print("decoding", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decoder_workers_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """Nothing the parent started (workers, multiprocessing's resource tracker) outlives it."""
    import signal
    import subprocess
    import time

    path = write(tmp_path / "n.jpg", noisy_jpeg(64, 64))
    started: list[int] = []
    child = subprocess.Popen(
        [sys.executable, "-c", _DECODING_CHILD, *[str(path)] * 50],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "decoding\n"
        started += [c.pid for c in psutil.Process(child.pid).children()]
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in started]
        assert sum(b"--multiprocessing-fork" in c for c in commands) == 2  # the workers
        assert sum(b"resource_tracker" in c for c in commands) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in started if _alive(p)], "left running after the parent died"
    finally:
        if child.poll() is None:
            child.kill()
        for pid in started:  # what a failure left behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
