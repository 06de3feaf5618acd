"""The decoder processes behind :func:`lookalike.images.decode_many`.

A spawned pool streams chunks of files through workers, keeping a bounded number in flight;
a chunk whose worker died is retried one file per process, so that the crash is pinned on
one file. Workers die with the process that started them (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from pathlib import Path

from lookalike.errors import ConfigError
from lookalike.images import Decoded

logger = logging.getLogger(__name__)

# A worker's entry point: (chunk of (index, path), max_side, upscale) -> one Decoded each.
Task = Callable[[list[tuple[int, str]], int | None, bool], list[Decoded]]
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def decode_in_pool(
    task: Task,
    paths: Iterable[str | Path],
    max_side: int | None,
    upscale: bool,
    workers: int,
    chunksize: int,
) -> Iterator[Decoded]:
    """:func:`~lookalike.images.decode_many` with workers: ``task(chunk, max_side, upscale)``
    decodes each chunk of ``(index, path)`` in a worker; results in input order."""
    ctx = multiprocessing.get_context("spawn")
    numbered = enumerate(str(p) for p in paths)
    chunks = iter(lambda: list(itertools.islice(numbered, chunksize)), [])
    pool = _pool(ctx, workers)

    def submit(chunk: list[tuple[int, str]]) -> Future[list[Decoded]]:
        nonlocal pool
        try:
            return pool.submit(task, chunk, max_side, upscale)
        except BrokenProcessPool:  # a worker died earlier; its chunks are retried on their turn
            pool.shutdown(wait=False, cancel_futures=True)
            pool = _pool(ctx, workers)
            return pool.submit(task, chunk, max_side, upscale)

    try:
        pending = deque((c, submit(c)) for c in itertools.islice(chunks, 4 * workers))
        while pending:
            chunk, future = pending.popleft()
            try:
                results = future.result()
            except Exception:
                results = _retry_one_by_one(task, chunk, max_side, upscale, ctx)
            for nxt in itertools.islice(chunks, 1):  # refill before the consumer takes over
                pending.append((nxt, submit(nxt)))
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(ctx: BaseContext, workers: int) -> ProcessPoolExecutor:
    """A pool of decoder processes that die with this process (:func:`_die_with_parent`)."""
    return ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
    )


def _die_with_parent(parent: int) -> None:
    """Pool initializer: have the kernel SIGKILL this worker when its parent dies.

    Without it a worker of a SIGKILLed indexer waits on its task pipe for ever, and keeps
    multiprocessing's ``resource_tracker`` alive too (it exits once every holder of its pipe
    has). Linux only (``prctl(PR_SET_PDEATHSIG)``), a no-op elsewhere. The signal follows the
    parent *thread* that started the worker: a pool is used by the thread that made it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return
    unsigned = ctypes.c_ulong
    if prctl(ctypes.c_int(_PR_SET_PDEATHSIG), unsigned(signal.SIGKILL), unsigned(0), unsigned(0),
             unsigned(0)) != 0:  # fmt: skip
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    elif os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _retry_one_by_one(
    task: Task, chunk: list[tuple[int, str]], max_side: int | None, upscale: bool, ctx: BaseContext
) -> list[Decoded]:
    """Decode a chunk whose worker died, one file per call, to pin the crash on one file."""
    logger.warning("A decoder process died; retrying %d files one by one", len(chunk))
    out: list[Decoded] = []
    pool = _started_pool(ctx)
    try:
        for index, path in chunk:
            try:
                out.extend(pool.submit(task, [(index, path)], max_side, upscale).result())
            except BrokenProcessPool:
                pool.shutdown(wait=False)
                pool = _started_pool(ctx)
                reason = f"Decoding {path} crashed the decoder process; re-export or delete it."
                out.append(Decoded(index=index, path=path, error=reason))
            except Exception as exc:
                out.append(Decoded(index=index, path=path, error=f"{type(exc).__name__}: {exc}"))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _started_pool(ctx: BaseContext) -> ProcessPoolExecutor:
    """A one-worker pool known to start, so that a dying worker can be blamed on its file."""
    pool = _pool(ctx, 1)
    try:
        pool.submit(abs, 0).result()
    except BrokenProcessPool as exc:
        pool.shutdown(wait=False)
        raise ConfigError(
            "Image decoder processes cannot start (see the child's traceback above); run from a "
            "script file guarded by `if __name__ == '__main__':`, or use workers=0."
        ) from exc
    return pool
