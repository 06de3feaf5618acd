"""The machinery of the fault-injection suite (``test_faults.py``): sandboxes, damage, runs,
and the classification of what each run did.

A *sandbox* is a folder holding ``images/`` (the collection), ``idx/`` (the index under
test) and ``outside/`` (files that nothing may touch: a decoy, the targets of planted
symlinks); commands run with the sandbox as their working directory. A *case* damages
``idx`` (or its disk), then runs ``info``, ``search`` (queries that must find themselves),
``index`` again and ``search`` once more, and, where the
index is still refused, ``repair``, ``index`` when repair says images are to be described
again, and ``search``. Each run is classified:

* ``ok``: exit 0 and the result equals the clean index's (search: same ids, paths and
  inliers, scores within 1e-4; info: same counts, whitening and live vectors);
* ``error``: a one-line ``error: ...`` and a non-zero exit;
* ``FAIL traceback`` (also an ``unexpected ...`` line: a fault nobody converted),
  ``FAIL wrong`` (exit 0, another result), ``FAIL hang`` (past the time limit),
  ``FAIL outside`` (a file outside ``idx`` changed, appeared or vanished).

A case's outcome: ``unaffected`` (every run ok), ``recovered`` (refused at first, correct
after ``index``/``repair``), ``recovered (approximately, warned)`` (a ``repair`` that warns
its result differs, e.g. a whitening learned again, and keeps every query's top 5),
``refused`` (one-line errors, never a wrong result), or the first ``FAIL``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "lookalike.cli"]
TIMEOUT_S = 300  # a run past this hangs
QUERY_IMAGE = "images/img003.png"  # a query that must find itself ...
QUERY_ID = 8  # ... and an indexed id
SEARCH = ["-k", "0", "--rerank", "dba,verify", "--verify-budget", "5", "--json"]
# what info must tell truly: the collection and its whitening (local features and the DBA
# are derived state that searches recompute when missing)
INFO_KEYS = (("counts",), ("whitening", "learned"), ("whitening", "dim_out"),
             ("backend", "live"))  # fmt: skip
FAIL = "FAIL"
APPROXIMATE = "approximate"  # after a repair that warned its result differs: same top results
# the words of lookalike.cli.faults' messages: faults the command line converted because
# nothing below it did
CLI_CONVERTED = ("no space left on the device holding", "is on a read-only file system",
                 "error: permission denied: ", "is missing: the index", "names what to repair",
                 "is locked by another process", "disk I/O error on")  # fmt: skip


@dataclass
class Run:
    """One command's exit status and output."""

    argv: list[str]
    rc: int
    out: str
    err: str

    @property
    def error_line(self) -> str | None:
        lines = [line for line in self.err.splitlines() if line.startswith("error: ")]
        return lines[0] if len(lines) == 1 else None


@dataclass
class Step:
    """A classified run: ``ok``, ``error`` or ``FAIL ...``, with the message's first words."""

    name: str
    kind: str
    message: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {self.kind}" + (f" ({self.message})" if self.message else "")


@dataclass
class Case:
    """The runs of one fault case and its outcome."""

    name: str
    steps: list[Step] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # files outside idx that changed

    @property
    def outcome(self) -> str:
        if self.outside:
            return f"{FAIL} outside"
        for step in self.steps:
            if step.kind.startswith(FAIL):
                return step.kind
        kinds = [s.kind for s in self.steps]
        if all(k == "ok" for k in kinds):
            return "unaffected"
        if kinds[-1] == APPROXIMATE:
            return "recovered (approximately, warned)"
        fixed = any(s.kind == "ok" and s.name in ("index", "repair") for s in self.steps)
        return "recovered" if kinds[-1] == "ok" and fixed else "refused"

    @property
    def message(self) -> str:
        """The first error or failure's words (what a user saw first)."""
        for step in self.steps:
            if step.kind != "ok" and step.message:
                return f"{step.name}: {step.message}"
        return ""

    def describe(self) -> str:
        extra = f"; outside: {', '.join(self.outside)}" if self.outside else ""
        return f"{self.name}: {self.outcome}: " + "; ".join(map(str, self.steps)) + extra


# -- running the command line -------------------------------------------------------------


def run_process(argv: Sequence[object], cwd: Path, timeout: float = TIMEOUT_S) -> Run:
    """``lookalike ARGV`` in a fresh process (inheriting the environment)."""
    args = [str(a) for a in argv]
    try:
        # the environment as it is: a learned whitening depends on the BLAS thread count
        done = subprocess.run(
            [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
            errors="replace",
        )  # fmt: skip
    except subprocess.TimeoutExpired as error:
        return Run(args, -1, str(error.stdout or ""), f"timed out after {timeout} s")
    return Run(args, done.returncode, done.stdout, done.stderr)


def run_in_process(argv: Sequence[object], cwd: Path, timeout: float = TIMEOUT_S) -> Run:
    """``lookalike ARGV`` by :func:`lookalike.cli.main` in this process (the quick sample);
    an exception escaping it is reported as a traceback."""
    from lookalike.cli import main

    args = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
    except Exception as error:
        rc = 1
        err.write(f"Traceback (most recent call last): {type(error).__name__}: {error}\n")
    finally:
        os.chdir(old)
    return Run(args, rc, out.getvalue(), err.getvalue())


Runner = Callable[..., Run]


def search_argv(index: str = "idx") -> list[str]:
    """A search whose results are all compared: an image and an id, the whole index (-k 0)."""
    return ["search", "--index", index, QUERY_IMAGE, "--id", str(QUERY_ID), *SEARCH]


def index_argv(
    index: str = "idx", workers: int | None = None, options: Sequence[str] = ()
) -> list[str]:
    extra = [] if workers is None else ["--workers", str(workers)]
    return ["index", "images", "--index", index, "--json", "-q", *extra, *options]


# -- classifying runs ---------------------------------------------------------------------


def first_words(text: str, n: int = 12) -> str:
    text = text.removeprefix("error: ")
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def classify(name: str, run: Run, correct: Callable[[str], str | None] | None) -> Step:
    """A run as a :class:`Step`; ``correct(stdout)`` returns what differs, or None."""
    if run.rc == -1:
        return Step(name, f"{FAIL} hang", run.err)
    if "Traceback (most recent call last)" in run.err:
        last = [line for line in run.err.strip().splitlines() if line.strip()][-1]
        return Step(name, f"{FAIL} traceback", first_words(last, 16))
    line = run.error_line
    if line is not None and line.startswith("error: unexpected "):
        return Step(name, f"{FAIL} traceback", first_words(line, 16))
    if run.rc != 0:
        if line is None:
            return Step(name, f"{FAIL} traceback", f"exit {run.rc}: {first_words(run.err, 16)}")
        mark = " [cli]" if any(w in line for w in CLI_CONVERTED) else ""
        return Step(name, "error", f"exit {run.rc}{mark}: {first_words(line)}")
    if correct is not None:
        wrong = correct(run.out)
        if wrong is not None:
            return Step(name, f"{FAIL} wrong", wrong)
    return Step(name, "ok")


def same_search(expected: str) -> Callable[[str], str | None]:
    """A check that a search's JSON Lines equal ``expected``'s (scores within 1e-4)."""
    want = [json.loads(line) for line in expected.splitlines()]

    def check(out: str) -> str | None:
        try:
            got = [json.loads(line) for line in out.splitlines()]
        except json.JSONDecodeError:
            return f"not JSON Lines: {first_words(out)}"
        if len(got) != len(want):
            return f"{len(got)} answers, expected {len(want)}"
        for g, w in zip(got, want, strict=True):
            if "results" not in g:
                return f"{g.get('query')}: {first_words(str(g.get('error')))}"
            gr, wr = g["results"], w["results"]
            if len(gr) != len(wr):
                return f"{g['query']}: {len(gr)} results, expected {len(wr)}"
            for a, b in zip(gr, wr, strict=True):
                if (a["id"], a["path"], a.get("inliers")) != (b["id"], b["path"], b.get("inliers")):
                    mine, theirs = (a["id"], a.get("inliers")), (b["id"], b.get("inliers"))
                    return f"{g['query']}: rank {a['rank']} (id, inliers) {mine}, expected {theirs}"
                if abs(a["score"] - b["score"]) > 1e-4:
                    return (
                        f"{g['query']}: rank {a['rank']} score {a['score']}, expected {b['score']}"
                    )
        return None

    return check


def same_top(expected: str, out: str, k: int = 5) -> bool:
    """Whether every query's top ``k`` ids are the expected ones (scores aside)."""
    try:
        got = [json.loads(line) for line in out.splitlines()]
    except json.JSONDecodeError:
        return False
    want = [json.loads(line) for line in expected.splitlines()]

    def tops(answers: list[dict]) -> list[list[int]]:
        return [[h["id"] for h in a.get("results", [])][:k] for a in answers]

    return tops(got) == tops(want)


def same_info(expected: str) -> Callable[[str], str | None]:
    """A check that ``info --json`` tells what it told of the clean index (:data:`INFO_KEYS`)."""
    want = json.loads(expected)

    def pick(d: dict | None, keys: tuple[str, ...]) -> object:
        for key in keys:
            d = d.get(key) if isinstance(d, dict) else None
        return d

    def check(out: str) -> str | None:
        try:
            got = json.loads(out)
        except json.JSONDecodeError:
            return f"not JSON: {first_words(out)}"
        for keys in INFO_KEYS:
            if pick(got, keys) != pick(want, keys):
                return f"info says {'.'.join(keys)}={pick(got, keys)}, clean {pick(want, keys)}"
        return None

    return check


# -- sandboxes, snapshots and damage ------------------------------------------------------


def snapshot(sandbox: Path, skip: Sequence[str] = ("idx",)) -> dict[str, tuple[int, int, str]]:
    """``relative path -> (size, mtime_ns, sha1)`` of every file of ``sandbox`` outside the
    top-level folders ``skip`` (symlinks: their target text)."""
    out = {}
    for dirpath, dirs, files in os.walk(sandbox):
        rel = Path(dirpath).relative_to(sandbox)
        if rel.parts[:1] and rel.parts[0] in skip:
            dirs[:] = []
            continue
        for name in files + [d for d in dirs if (Path(dirpath) / d).is_symlink()]:
            path = Path(dirpath) / name
            key = str(rel / name)
            if path.is_symlink():
                out[key] = (0, 0, f"-> {os.readlink(path)}")
                continue
            st = path.stat()
            out[key] = (st.st_size, st.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return out


def changed(before: dict, after: dict) -> list[str]:
    keys = sorted(set(before) | set(after))
    return [k for k in keys if before.get(k) != after.get(k)]


def reset_index(sandbox: Path, clean: Path) -> Path:
    """``sandbox/idx`` as a fresh copy of the clean index."""
    idx = sandbox / "idx"
    if idx.is_symlink() or idx.is_file():
        idx.unlink()
    elif idx.exists():
        shutil.rmtree(idx)
    shutil.copytree(clean, idx, symlinks=True)
    return idx


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def index_file(idx: Path, name: str) -> Path:
    """The file ``name`` of an index: a fixed name, or ``checkpoint`` (its backend file)."""
    if name == "checkpoint":
        (path,) = sorted(idx.glob("*-*.index"))
        return path
    return idx / name


def run_case(
    name: str,
    sandbox: Path,
    baseline: dict[str, str],
    run: Runner,
    damage: Callable[[Path], None] | None = None,
    commands: Sequence[str] = ("info", "search", "index", "search"),
    workers: int | None = None,
    index: str = "idx",
    index_options: Sequence[str] = (),
) -> Case:
    """Damage ``sandbox/idx`` (already a copy of the clean index), run ``commands`` on the
    index at ``index`` (relative to the sandbox) and classify them; ``repair`` + ``search``
    follow when the index is still refused."""
    skip = (index.split("/")[0], "idx")
    if damage is not None:
        damage(sandbox / index)
    before = snapshot(sandbox, skip)  # what the damage itself put outside is no write
    case = Case(name)
    for command in commands:
        if command == "info":
            r = run(["info", "--index", index, "--json"], sandbox)
            case.steps.append(classify("info", r, same_info(baseline["info"])))
        elif command == "search":
            r = run(search_argv(index), sandbox)
            case.steps.append(classify("search", r, same_search(baseline["search"])))
        elif command == "index":
            r = run(index_argv(index, workers, index_options), sandbox)
            case.steps.append(classify("index", r, None))
        elif command == "remove":
            r = run(["remove", "--index", index, "--id", "999"], sandbox)
            case.steps.append(classify("remove", r, None))
        else:
            raise ValueError(command)
    if case.steps and case.steps[-1].kind == "error":
        repair = run(["repair", "--index", index], sandbox)
        case.steps.append(classify("repair", repair, None))
        if "to describe again" in repair.out:  # what repair tells the user to do next
            r = run(index_argv(index, workers, index_options), sandbox)
            case.steps.append(classify("index", r, None))
        r = run(search_argv(index), sandbox)
        step = classify("search", r, same_search(baseline["search"]))
        warned = any(w in repair.err for w in ("warning:", "WARNING")) and "differ" in repair.err
        if step.kind == f"{FAIL} wrong" and warned and same_top(baseline["search"], r.out):
            # a repair that says its result differs (a whitening learned again) and keeps
            # every query's top results: approximate, not silent
            step = Step("search", APPROXIMATE, f"repair warned: {step.message}")
        case.steps.append(step)
    case.outside = changed(before, snapshot(sandbox, skip))
    return case


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (``"4m"``) mounted at ``where``; skips where mount is not
    permitted."""
    import pytest

    where.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the file system of ``disk`` with ``disk/filler`` so that about ``leave`` bytes
    stay free; returns the filler (delete it to free the space)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        todo = max(0, free - leave)
        while todo > 0:
            todo -= f.write(chunk[: min(len(chunk), todo)])
        f.flush()
        os.fsync(f.fileno())
    return filler


def table(cases: Sequence[Case]) -> list[str]:
    """Markdown rows: case | outcome | message (first words)."""
    rows = []
    for case in cases:
        message = case.message.replace("|", "\\|")
        rows.append(f"| {case.name} | {case.outcome} | {message} |")
    return rows
