"""Fault injection: every fault ends in a one-line error or a correct result, with a valid
index, never a traceback, never a silently wrong result, never a write outside the index.

Real files and real processes (``python -m lookalike.cli``; the quick sample in the default
suite runs :func:`lookalike.cli.main` in-process): a 40-image index (default preset, so a
whitening is learned; SIFT local features; a stored DBA and a faiss checkpoint) is copied,
damaged, and then ``info``, ``search`` (an image and an id that must find themselves, the
whole index ranked through DBA and verification), ``index`` and ``search`` again run on it
(machinery and outcomes: ``faults_harness.py``). The faults:

* random damage at 50 seeded offsets of each index file (``-m slow``; one offset each in
  the default suite): 8 bytes overwritten, or the file truncated there (every tenth);
* the damage the issue found by hand (random manifest, a bad ``dim``, an empty or
  garbled ``meta.sqlite``, a deleted whitening, a truncated vector file, an altered or NaN
  vector row, ...);
* symlinks planted at every fixed name (to an outside copy, or dangling), and paths taken
  from the index's own data (``vectors_file`` in the kv table);
* a full disk (a small tmpfs) during ``index``, during a checkpoint, and while ``search
  --rerank dba`` stores its DBA; a read-only index directory.

``LOOKALIKE_FAULTS_TABLE=docs/faults.md pytest -m "slow or not slow" tests/test_faults.py``
rewrites the results table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import read_only_view, write_images
from faults_harness import (
    FAIL,
    QUERY_ID,
    Case,
    index_file,
    overwrite,
    reset_index,
    run_case,
    run_in_process,
    run_process,
    search_argv,
    table,
    tmpfs,
    truncate,
)
from faults_harness import fill as fill_disk

N_IMAGES = 40  # > 32: the default preset learns its whitening
LOCAL = ["--local", "sift", "--local-keypoints", "256"]
FILES = ("manifest.json", "meta.sqlite", "vectors.f32", "whitening.npz", "dba.npz",
         "checkpoint", "local/local.sqlite", "local/features.bin")  # fmt: skip
OFFSETS = 50  # damaged offsets per file in the long sweep
SEED = 8  # issue 8
RESULTS: dict[str, list[Case]] = {}  # group -> cases, for the table


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sandbox (images, an outside decoy), the clean index and its baseline outputs."""
    base = tmp_path_factory.mktemp("faults")
    sandbox = base / "sandbox"
    write_images(sandbox / "images", N_IMAGES, side=64)
    (sandbox / "outside").mkdir()
    (sandbox / "outside" / "decoy.bin").write_bytes(b"must stay as it is\n" * 100)
    # built by the command as a user runs it (a learned whitening depends on the threads)
    r = run_process(["index", "images", "--index", "idx", "-q", *LOCAL], sandbox)
    assert r.rc == 0, r.err
    r = run_process(search_argv(), sandbox)  # stores dba.npz
    assert r.rc == 0 and (sandbox / "idx" / "dba.npz").is_file(), r.err
    shutil.move(sandbox / "idx", base / "clean")
    reset_index(sandbox, base / "clean")
    baseline = {
        "search": run_process(search_argv(), sandbox).out,
        "info": run_process(["info", "--index", "idx", "--json"], sandbox).out,
    }
    found = [json.loads(line)["results"][0]["id"] for line in baseline["search"].splitlines()]
    assert (
        found[1] == QUERY_ID
        and len(json.loads(baseline["search"].splitlines()[0])["results"]) == N_IMAGES
    )
    return {"base": base, "sandbox": sandbox, "clean": base / "clean", "baseline": baseline}


@pytest.fixture(scope="module", autouse=True)
def results_table():
    """Writes the results table to ``$LOOKALIKE_FAULTS_TABLE`` after the module, if set."""
    yield
    target = os.environ.get("LOOKALIKE_FAULTS_TABLE")
    if target and RESULTS:
        # the sandbox's own path is the test run's, not the result's
        text = re.sub(r"/\S*?/faults\d*/sandbox/", "", render(RESULTS))
        Path(target).write_text(text)


def record(group: str, case: Case) -> Case:
    RESULTS.setdefault(group, []).append(case)
    return case


def assert_no_failure(cases: list[Case]) -> None:
    failed = [c.describe() for c in cases if c.outcome.startswith(FAIL)]
    assert not failed, "\n".join(failed)


def damage_at(name: str, n: int, seed: int = SEED):
    """Damage number ``n`` of file ``name``: 8 random bytes at a seeded offset, or (every
    tenth) a truncation there."""

    def damage(idx: Path) -> None:
        path = index_file(idx, name)
        size = path.stat().st_size
        rng = np.random.default_rng([seed, FILES.index(name), n])
        offset = int(rng.integers(0, max(size, 1)))
        if n % 10 == 9:
            truncate(path, offset)
        else:
            overwrite(path, offset, rng.integers(0, 256, 8, dtype=np.uint8).tobytes())

    return damage


def corrupt_case(clean: dict, name: str, n: int, run=run_process, workers=None) -> Case:
    reset_index(clean["sandbox"], clean["clean"])
    label = f"{name} {'truncated' if n % 10 == 9 else 'overwritten'} #{n}"
    return run_case(
        label, clean["sandbox"], clean["baseline"], run, damage_at(name, n), workers=workers
    )


# -- the quick sample (default suite) -------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest.json", "vectors.f32", "checkpoint"])
def test_a_damaged_file_is_refused_or_recovered(clean, name):
    case = corrupt_case(clean, name, 0, run=run_in_process, workers=0)
    assert_no_failure([case])


def test_a_full_disk_during_index_is_one_line_and_resumes(clean):
    sandbox = clean["sandbox"]
    with tmpfs(sandbox / "disk", "8m") as disk:
        filler = fill_disk(disk, 256 << 10)
        argv = ["index", "images", "--index", "disk/idx", "-q", "--workers", "0", *LOCAL]
        r = run_in_process(argv, sandbox)
        assert r.rc == 6 and r.error_line is not None, r.err
        assert "full" in r.error_line or "no space" in r.error_line
        filler.unlink()
        assert run_in_process(argv, sandbox).rc == 0
        case = run_case(
            "full disk",
            sandbox,
            clean["baseline"],
            run_in_process,
            commands=("search",),
            index="disk/idx",
        )
    assert_no_failure([case])


def test_a_read_only_index_is_searched_and_refuses_writes(clean):
    case = read_only_case(clean, run_in_process, workers=0)
    kinds = [s.kind for s in case.steps]
    assert kinds[:2] == ["ok", "ok"], case.describe()
    assert all(s.message.startswith("exit 6") for s in case.steps[2:4]), case.describe()
    assert_no_failure([case])


def read_only_case(clean: dict, run, workers: int | None = None) -> Case:
    """``info``, ``search``, ``index`` and ``remove`` on a read-only bind mount of the index
    (without its DBA: searches compute it and cannot store it)."""
    sandbox = clean["sandbox"]
    idx = reset_index(sandbox, clean["clean"])
    (idx / "dba.npz").unlink()
    with read_only_view(idx) as view:
        return run_case(
            "read-only directory (bind mount)",
            sandbox,
            clean["baseline"],
            run,
            commands=("info", "search", "index", "remove"),
            index=view.name,
            workers=workers,
        )


# -- the damage found by hand ---------------------------------------------------------------


def _edit_manifest(idx: Path, **changes: object) -> None:
    path = idx / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _sql(idx: Path, statement: str) -> None:
    con = sqlite3.connect(idx / "meta.sqlite")
    with con:
        con.execute(statement)
    con.close()


def _vector_row(idx: Path, row: int, value: float) -> None:
    dim = json.loads((idx / "manifest.json").read_text())["dim"]
    overwrite(idx / "vectors.f32", row * dim * 4, np.full(dim, value, np.float32).tobytes())


def _garbage_page(idx: Path) -> None:
    path = idx / "meta.sqlite"
    page = 4096
    overwrite(path, page * (path.stat().st_size // page // 2), os.urandom(page))


NAMED = {
    "manifest.json of random bytes": lambda idx: (idx / "manifest.json").write_bytes(
        os.urandom(900)
    ),
    'manifest.json "dim": "abc"': lambda idx: _edit_manifest(idx, dim="abc"),
    "manifest.json deleted": lambda idx: (idx / "manifest.json").unlink(),
    "meta.sqlite of zero bytes": lambda idx: truncate(idx / "meta.sqlite", 0),
    "meta.sqlite with a garbage page": _garbage_page,
    "whitening.npz garbage": lambda idx: (idx / "whitening.npz").write_bytes(os.urandom(5000)),
    "whitening.npz deleted": lambda idx: (idx / "whitening.npz").unlink(),
    "vectors.f32 truncated": lambda idx: truncate(idx / "vectors.f32", 5 * 5120 + 100),
    "vectors.f32: a row overwritten": lambda idx: _vector_row(idx, QUERY_ID - 1, 0.01),
    "vectors.f32: a NaN row": lambda idx: _vector_row(idx, 3, float("nan")),
    "checkpoint deleted": lambda idx: index_file(idx, "checkpoint").unlink(),
    "dba.npz deleted": lambda idx: (idx / "dba.npz").unlink(),
    "dba.npz garbage": lambda idx: (idx / "dba.npz").write_bytes(os.urandom(3000)),
    "local/features.bin truncated": lambda idx: truncate(idx / "local" / "features.bin", 1000),
    "local/ deleted": lambda idx: shutil.rmtree(idx / "local"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NAMED))
def test_damage_found_by_hand(clean, name):
    reset_index(clean["sandbox"], clean["clean"])
    case = run_case(name, clean["sandbox"], clean["baseline"], run_process, NAMED[name])
    assert_no_failure([record("found by hand", case)])


# -- symlinks at every fixed name, paths from the index's own data --------------------------

FIXED = ("manifest.json", "meta.sqlite", "vectors.f32", "whitening.npz", "dba.npz",
         "checkpoint", "lock", "local", "local/local.sqlite", "local/features.bin")  # fmt: skip


def plant(name: str, dangling: bool):
    """Replace the entry ``name`` by a symlink to an outside copy of it (or to nothing)."""

    def damage(idx: Path) -> None:
        path = index_file(idx, name)
        target = idx.parent / "outside" / ("missing" if dangling else path.name)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if dangling:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            shutil.move(path, target)
        path.symlink_to(target)

    return damage


def _kv_path(value: str):
    return lambda idx: _sql(idx, f"UPDATE kv SET value = '{value}' WHERE key = 'vectors_file'")


@pytest.mark.slow
@pytest.mark.parametrize("dangling", [False, True], ids=["to-outside-copy", "dangling"])
@pytest.mark.parametrize("name", FIXED)
def test_symlinks_at_fixed_names_write_nothing_outside(clean, name, dangling):
    reset_index(clean["sandbox"], clean["clean"])
    label = f"symlink at {name} ({'dangling' if dangling else 'to an outside copy'})"
    case = run_case(
        label,
        clean["sandbox"],
        clean["baseline"],
        run_process,
        plant(name, dangling),
        commands=("info", "search", "remove", "index", "search"),
    )
    assert_no_failure([record("symlinks", case)])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["../outside/x.f32", "ABSOLUTE"])
def test_paths_from_the_index_data_stay_inside(clean, where):
    sandbox = clean["sandbox"]
    reset_index(sandbox, clean["clean"])
    value = str(sandbox / "outside" / "abs.f32") if where == "ABSOLUTE" else where
    case = run_case(
        f"kv vectors_file = {where}",
        sandbox,
        clean["baseline"],
        run_process,
        _kv_path(value),
        commands=("info", "search", "remove", "index", "search"),
    )
    assert_no_failure([record("symlinks", case)])


# -- a full disk, a read-only directory ------------------------------------------------------


def on_disk(name: str, clean: dict, commands: tuple[str, ...], **options) -> Case:
    """A case on the index at ``disk/idx`` (on the small tmpfs), in real processes."""
    return run_case(
        name, clean["sandbox"], clean["baseline"], run_process, index="disk/idx",
        commands=commands, **options,
    )  # fmt: skip


LEAVE = (0, 32 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 3 << 19)  # bytes left free


def _rows(idx: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{idx / 'meta.sqlite'}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("leave", LEAVE)
def test_full_disk_during_index(clean, leave):
    sandbox = clean["sandbox"]
    argv = ["index", "images", "--index", "disk/idx", "-q", *LOCAL]
    with tmpfs(sandbox / "disk", "8m") as disk:
        filler = fill_disk(disk, leave)
        first = run_process(argv, sandbox)
        rows = _rows(disk / "idx")
        filler.unlink()
        case = on_disk(
            f"disk full during index ({leave >> 10} KiB free; {rows} rows committed)",
            clean,
            ("index", "search", "info"),
            index_options=LOCAL,
        )
    from faults_harness import classify

    case.steps.insert(0, classify("index (disk full)", first, None))
    assert_no_failure([record("full disk", case)])


@pytest.mark.slow
@pytest.mark.parametrize("leave", (0, 8 << 10, 24 << 10, 48 << 10, 96 << 10))
def test_full_disk_during_a_checkpoint(clean, leave):
    """8 more images into a full index: the rows fit, the checkpoint after them may not."""
    sandbox = clean["sandbox"]
    more = sandbox / "more"
    if not more.exists():
        write_images(more, N_IMAGES + 8, side=64)
        for p in sorted(more.iterdir())[:N_IMAGES]:
            p.unlink()
    expected = _baseline_with_more(clean)
    with tmpfs(sandbox / "disk", "8m") as disk:
        shutil.copytree(clean["clean"], disk / "idx")
        filler = fill_disk(disk, leave)
        first = run_process(["index", "more", "--index", "disk/idx", "-q"], sandbox)
        rows = _rows(disk / "idx")
        filler.unlink()
        second = run_process(["index", "more", "--index", "disk/idx", "-q"], sandbox)
        case = run_case(
            f"disk full during a checkpoint ({leave >> 10} KiB free; {rows} rows)",
            sandbox,
            expected,
            run_process,
            index="disk/idx",
            commands=("search",),
        )
    from faults_harness import classify

    case.steps[:0] = [classify("index (disk full)", first, None), classify("index", second, None)]
    assert_no_failure([record("full disk", case)])


def _baseline_with_more(clean: dict) -> dict:
    if "with_more" not in clean:
        sandbox = clean["sandbox"]
        reset_index(sandbox, clean["clean"])
        assert run_process(["index", "more", "--index", "idx", "-q"], sandbox).rc == 0
        clean["with_more"] = {"search": run_process(search_argv(), sandbox).out, "info": "{}"}
    return clean["with_more"]


@pytest.mark.slow
@pytest.mark.parametrize("leave", (0, 16 << 10))
def test_full_disk_while_search_stores_its_dba(clean, leave):
    sandbox = clean["sandbox"]
    with tmpfs(sandbox / "disk", "8m") as disk:
        shutil.copytree(clean["clean"], disk / "idx")
        (disk / "idx" / "dba.npz").unlink()
        filler = fill_disk(disk, leave)
        case = on_disk(
            f"disk full while search stores its DBA ({leave >> 10} KiB free)",
            clean,
            ("search", "info", "search"),
        )
        filler.unlink()
        after = run_case(
            "", sandbox, clean["baseline"], run_process, index="disk/idx", commands=("search",)
        )
        case.steps += after.steps
        stored = (disk / "idx" / "dba.npz").is_file()
    case.name += "" if stored else "; dba.npz not stored after space was freed"
    assert_no_failure([record("full disk", case)])


@pytest.mark.slow
def test_odd_names_in_the_image_folder(clean):
    """A non-UTF-8 name is indexed and found; dangling and looping symlinks are recorded."""
    from faults_harness import Step, classify

    sandbox = clean["sandbox"]
    odd = sandbox / "odd"
    if not odd.exists():
        write_images(odd, 3, side=64)
        os.rename(odd / "img002.png", os.fsencode(odd) + b"/caf\xe9.png")
        (odd / "dangling.png").symlink_to(odd / "nowhere.png")
        (odd / "loop.png").symlink_to(odd / "loop.png")
    case = Case("image folder: a non-UTF-8 name, a dangling and a looping symlink")
    r = run_process(["index", "odd", "--index", "odd-idx", "--json", "-q"], sandbox)
    step = classify("index", r, None)
    if step.kind == "ok":
        report = json.loads(r.out)
        reasons = {Path(f["path"]).name: f["error"] for f in report["failed"]}
        # added: the two images and the odd name; failed: the symlinks, with their reason
        if report["added"] != 3 or set(reasons) != {"dangling.png", "loop.png"}:
            step = Step("index", f"{FAIL} wrong", f"added {report['added']}, failed {reasons}")
    case.steps.append(step)
    query = os.fsdecode(os.fsencode(odd) + b"/caf\xe9.png")
    r = run_process(["search", "--index", "odd-idx", query, "-k", "1", "--json"], sandbox)

    def finds_itself(out: str) -> str | None:
        (hit,) = json.loads(out)["results"]
        return None if hit["score"] > 0.999 and "caf" in hit["path"] else f"found {hit}"

    case.steps.append(classify("search", r, finds_itself))
    r = run_process(["info", "--index", "odd-idx"], sandbox)
    case.steps.append(classify("info", r, None))
    shutil.rmtree(sandbox / "odd-idx", ignore_errors=True)
    assert_no_failure([record("odd names", case)])


@pytest.mark.slow
def test_read_only_directory(clean):
    case = read_only_case(clean, run_process)
    assert_no_failure([record("read-only", case)])


# -- the long sweep: 50 offsets of each index file ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_random_damage_sweep(clean, name):
    # in this process (the command line's main(), decoding in-process): 400 cases in minutes,
    # not hours; the named cases above run real processes
    cases = [
        record(f"damage: {name}", corrupt_case(clean, name, n, run=run_in_process, workers=0))
        for n in range(OFFSETS)
    ]
    assert_no_failure(cases)


# -- the table ------------------------------------------------------------------------------


def render(results: dict[str, list[Case]]) -> str:
    """The results as docs/faults.md: counts, one row per case (per damaged file for the
    sweep), and every failure in full."""
    cases = [c for group in results.values() for c in group]
    counts = Counter("FAIL" if c.outcome.startswith(FAIL) else c.outcome for c in cases)
    lines = [
        "# Fault injection: results",
        "",
        "What `tests/test_faults.py` found; regenerate with",
        "`LOOKALIKE_FAULTS_TABLE=docs/faults.md .venv/bin/pytest -m 'slow or not slow' "
        "tests/test_faults.py`. Each case damages a copy of a 40-image index (default preset, "
        "SIFT local features, a stored DBA, a faiss checkpoint), or its disk, then runs `info`, "
        "`search` (an image and an id, the whole index ranked through DBA and verification, "
        "compared with the clean index), `index` and `search` again, and, when still refused, "
        "`repair` (+ `index` when it says images are to be described again) and `search`. "
        "Outcomes: **unaffected** (every run correct), **recovered** "
        "(refused or damaged, then correct after `index` or `repair`), **refused** (one-line "
        "errors, never a wrong result), **FAIL** (a traceback or an unconverted error, a wrong "
        "result, a hang, a write outside the index directory). Message: the first error a user "
        "saw; `[cli]` marks faults the command line converted (not converted at their source). "
        "Not a fault: a row changed through SQLite itself (an image's path edited) is a valid "
        "write, and is taken as the truth like any other.",
        "",
        "| outcome | cases |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(counts.items())),
        "",
    ]
    for group, group_cases in results.items():
        lines += [f"## {group}", ""]
        if group.startswith("damage:"):
            lines += sweep_summary(group_cases)
        else:
            lines += ["| case | outcome | message (first words) |", "|---|---|---|"]
            lines += [*table(group_cases), ""]
    failed = [c.describe() for c in cases if c.outcome.startswith(FAIL)]
    lines += ["## Open failures", "", *(f"- {f}" for f in failed or ["none"]), ""]
    return "\n".join(lines)


def sweep_summary(cases: list[Case]) -> list[str]:
    """One file's sweep: outcome counts and its most frequent messages."""
    outcomes = Counter(c.outcome for c in cases)
    messages = Counter(c.message.split(":", 1)[-1].strip()[:90] for c in cases if c.message)
    return [
        f"{len(cases)} damaged copies: "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        + ".",
        "",
        "| message (first words) | cases |",
        "|---|---|",
        *(f"| {m.replace('|', '/')} | {n} |" for m, n in messages.most_common(8)),
        "",
    ]
