"""The ``lookalike`` command line, end to end with the real default model.

Most tests call :func:`lookalike.cli.main` in-process (capsys); crash, lock and error-output
tests run ``python -m lookalike.cli`` in a subprocess, since they are about what a process
does and prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import distinct_image, near_duplicate, photo, write_images
from PIL import Image

from lookalike.cli import main, parse_box, parse_rotations
from lookalike.errors import (
    ConfigError,
    ImageError,
    IndexLockedError,
    IndexStateError,
    LookalikeError,
)
from lookalike.extract import get_preset
from lookalike.index import IndexStore
from lookalike.indexing import index_info

CLI = [sys.executable, "-m", "lookalike.cli"]
# The crash and lock tests are about the store, not the descriptor: no whitening to learn
# (an eigendecomposition of 1280 x 1280 takes seconds on a busy 2-core machine).
FAST = ("--preset", "fast")


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run ``lookalike ARGS`` in-process: ``(exit status, stdout, stderr)``."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def summary(out: str) -> dict[str, str]:
    """The ``  key  value`` lines of the ``index`` summary."""
    return dict(re.findall(r"^  (\S+) +(.+)$", out, flags=re.MULTILINE))


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def rows_committed(db: Path) -> int:
    """Image rows committed to ``meta.sqlite`` (0 before it exists), read-only."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(con.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:  # created but no schema yet
        return 0


def wait_for_rows(db: Path, at_least: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while rows_committed(db) < at_least:
        if proc.poll() is not None:
            raise AssertionError(f"indexer exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {at_least} committed rows after {timeout} s")
        time.sleep(0.005)


def stop(proc: subprocess.Popen) -> None:
    """Kill what the test started (its own process group) if it is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def stored_paths(index: Path) -> list[str]:
    with IndexStore.open(index) as store:
        return [r.path for r in store.records()]


@pytest.fixture(autouse=True)
def not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured output is no terminal, whatever the CI says: no progress bars, no colours."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """120 distinct 64 px images (read-only)."""
    return write_images(tmp_path_factory.mktemp("many") / "images", 120, side=64)


# -- 1. round trip ---------------------------------------------------------------------------


def test_round_trip(tmp_path, make_images, capsys, monkeypatch, default_extractor):
    paths = make_images(8, side=64)
    folder, index = paths[0].parent, tmp_path / "index"

    rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", "0", "-q")
    assert rc == 0, err
    s = summary(out)
    assert (s["added"], s["updated"], s["unchanged"], s["missing"], s["failed"]) == (
        "8",
        "0",
        "0",
        "0",
        "0",
    )
    assert float(s["images/s"]) > 0

    # Image queries: JSON Lines, one object per query, ranked best first, itself first; a
    # small gallery is verified by default (the inliers of each result)
    rc, out, err = cli(capsys, "search", "--index", index, paths[3], paths[5], "--json", "-k", 3)
    assert rc == 0, err
    lines = json_lines(out)
    assert [line["query"] for line in lines] == [str(paths[3]), str(paths[5])]
    ids = {}
    for line, path in zip(lines, (paths[3], paths[5]), strict=True):
        assert set(line) == {"query", "results"}
        results = line["results"]
        assert [r["rank"] for r in results] == [1, 2, 3]
        assert all(set(r) == {"rank", "id", "path", "score", "inliers"} for r in results)
        assert results[0]["path"] == str(path.resolve())
        assert results[0]["inliers"] > max(r["inliers"] for r in results[1:])  # itself
        assert results[0]["score"] > 0.99
        assert results[1]["score"] < 0.9  # a different photo
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True)
        ids[path] = results[0]["id"]

    # An id query: "query" is the indexed path; -k 0 ranks the whole index.
    rc, out, _ = cli(capsys, "search", "--index", index, "--id", ids[paths[3]], "--json", "-k", 0)
    (line,) = json_lines(out)
    assert line["query"] == str(paths[3].resolve())
    assert len(line["results"]) == 8
    assert len({r["id"] for r in line["results"]}) == 8
    assert line["results"][0]["id"] == ids[paths[3]]
    id_of = {r["path"]: r["id"] for r in line["results"]}

    # Human output: a table per query.
    rc, out, _ = cli(capsys, "search", "--index", index, paths[3], "-k", 2)
    assert rc == 0
    assert str(paths[3].resolve()) in out and "rank" in out and "score" in out

    # A file's content changes: processed again, same id.
    changed = paths[2]
    distinct_image(50, 64).save(changed)
    stamp = time.time() + 10
    os.utime(changed, (stamp, stamp))
    rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", "0", "-q")
    assert rc == 0, err
    s = summary(out)
    assert (s["added"], s["updated"], s["unchanged"]) == ("0", "1", "7")
    rc, out, _ = cli(capsys, "search", "--index", index, changed, "--json", "-k", 1)
    (line,) = json_lines(out)
    assert line["results"][0]["id"] == id_of[str(changed.resolve())]
    assert line["results"][0]["score"] > 0.99  # the new content was described

    # A file vanishes: reported missing, then dropped with --remove-missing.
    gone = paths[7]
    gone.unlink()
    rc, out, _ = cli(capsys, "index", folder, "--index", index, "--workers", "0", "-q")
    assert (summary(out)["missing"], summary(out)["unchanged"]) == ("1", "7")
    rc, out, _ = cli(
        capsys, "index", folder, "--index", index, "--workers", "0", "-q", "--remove-missing"
    )
    assert rc == 0
    assert summary(out)["removed"] == "1"
    rc, out, _ = cli(capsys, "search", "--index", index, "--id", ids[paths[3]], "--json", "-k", 0)
    found = [r["path"] for r in json_lines(out)[0]["results"]]
    assert len(found) == 7 and str(gone.resolve()) not in found

    # remove --id, then remove PATH (relative: resolved against the working directory).
    rc, out, _ = cli(capsys, "remove", "--index", index, "--id", id_of[str(paths[0].resolve())])
    assert rc == 0 and "removed 1 image " in out
    monkeypatch.chdir(folder)
    rc, out, _ = cli(capsys, "remove", "--index", index, paths[1].name, "nothing-here.png")
    assert rc == 0 and "removed 1 image " in out and "1 of the 2 given" in out

    rc, out, _ = cli(capsys, "info", "--index", index, "--json")
    info = json.loads(out)
    assert info["counts"] == {"ok": 5, "error": 0}
    assert info["failed"] == []
    assert info["descriptor"]["pooling"] == default_extractor.conf.pooling
    rc, out, _ = cli(capsys, "search", "--index", index, "--id", ids[paths[3]], "--json", "-k", 0)
    left = {r["path"] for r in json_lines(out)[0]["results"]}
    assert left == {str(p.resolve()) for p in (paths[2], paths[3], paths[4], paths[5], paths[6])}


# -- 3. resume after SIGKILL -----------------------------------------------------------------


@pytest.mark.usefixtures("default_extractor")  # the ONNX graph is exported before the child starts
def test_resume_after_sigkill(tmp_path, many_images, capsys):
    folder, index = many_images[0].parent, tmp_path / "index"
    proc = subprocess.Popen(
        [*CLI, "index", str(folder), "--index", str(index), "--chunk", "8", "-q", *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the decoder processes die with it
    )
    try:
        wait_for_rows(index / "meta.sqlite", 16, proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    committed = rows_committed(index / "meta.sqlite")
    assert 16 <= committed < len(many_images)

    rc, out, err = cli(capsys, "index", folder, "--index", index, "--chunk", 8, "--workers", 0)
    assert rc == 0, err
    s = summary(out)
    assert int(s["unchanged"]) == committed  # finished batches are not redone
    assert int(s["added"]) == len(many_images) - committed
    assert s["failed"] == "0"
    paths = stored_paths(index)
    assert len(paths) == len(set(paths)) == len(many_images)
    assert set(paths) == {str(p.resolve()) for p in many_images}
    with IndexStore.open(index) as store:  # the faiss view agrees with the rows
        assert store.manifest.descriptor["pooling"] == get_preset("fast").pooling
        first = next(store.records()).id
        _, ids = store.search(store.vectors([first]), k=0)
        assert ids[0, 0] == first
        assert len(set(ids[0].tolist()) - {-1}) == len(many_images)


# -- 4. one writer at a time -----------------------------------------------------------------


@pytest.mark.usefixtures("default_extractor")
def test_second_writer_is_refused(tmp_path, many_images, capsys):
    folder, index = many_images[0].parent, tmp_path / "index"
    first = subprocess.Popen(
        [*CLI, "index", str(folder), "--index", str(index), "--chunk", "8", "-q", *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_rows(index / "meta.sqlite", 8, first)
        rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", "0")
        assert first.poll() is None, "the first writer finished too early for this test"
        assert rc == IndexLockedError.exit_code
        assert "being written by another process" in one_line_error(err)
        assert out == ""
        out, err = first.communicate(timeout=300)
    finally:
        stop(first)
    assert first.returncode == 0, err
    assert summary(out)["added"] == str(len(many_images))
    paths = stored_paths(index)
    assert len(paths) == len(set(paths)) == len(many_images)
    rc, out, _ = cli(capsys, "index", folder, "--index", index, "--workers", "0", "-q")
    assert rc == 0 and summary(out)["unchanged"] == str(len(many_images))


# -- 5. wrong index directory, bad options ---------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty", "not-an-index", "a-file"])
def test_search_refuses_what_is_not_an_index(tmp_path, capsys, kind):
    target = tmp_path / kind
    if kind == "empty":
        target.mkdir()
    elif kind == "not-an-index":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif kind == "a-file":
        target.write_text("hello")
    rc, out, err = cli(capsys, "search", "--index", target, tmp_path / "q.jpg")
    assert rc == IndexStateError.exit_code
    assert str(target) in one_line_error(err)
    assert out == ""
    assert not (target.is_dir() and (target / "lock").exists())  # nothing written there


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--pooling", "gem"], ["pooling"]),
        (["--preset", "fast"], ["image_size", "pooling", "whitening"]),
        (["--image-size", "256"], ["image_size"]),
        (["--factory", "HNSW32"], ["factory"]),
    ],
)
def test_index_refuses_other_settings(small_index, capsys, options, named):
    folder, index = small_index
    rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", "0", *options)
    assert rc == IndexStateError.exit_code
    line = one_line_error(err)
    assert all(name in line for name in named)
    assert out == ""


def test_index_reuses_the_index_settings_by_default(small_index, capsys):
    folder, index = small_index
    rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", "0", "-q")
    assert rc == 0, err
    assert summary(out)["unchanged"] == "6"


def test_index_says_when_it_records_other_query_defaults(small_index, tmp_path, capsys):
    folder, built = small_index
    index = shutil.copytree(built, tmp_path / "index")
    argv = ["index", folder, "--index", index, "--workers", "0", "-q", "--preset", "upright"]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    assert "rotations 0, crops none recorded as this index's search defaults" in out
    assert summary(out)["unchanged"] == "6"
    rc, out, _ = cli(capsys, "info", "--index", index)
    assert rc == 0 and "rotations [0]" in out
    rc, out, _ = cli(capsys, *argv)  # recorded already: nothing to say
    assert rc == 0 and "recorded as" not in out


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        ("search --index {index} {query} --box 1,2,3", ConfigError.exit_code, "--box"),
        ("search --index {index} {query} --box a,b,c,d", ConfigError.exit_code, "--box"),
        ("search --index {index} {query} --box 10,10,5,50", ConfigError.exit_code, "empty"),
        ("search --index {index} {query} --rotations 0,45", ConfigError.exit_code, "of 90"),
        ("search --index {index} --id 99999", ConfigError.exit_code, "no image with id 99999"),
        ("search --index {index}", ConfigError.exit_code, "nothing to search"),
        ("search --index {index} {missing}", ImageError.exit_code, "does not exist"),
        ("index {folder} --index {new} --preset nope", ConfigError.exit_code, "preset 'nope'"),
        ("index {folder} --index {new} --index-preset nope", ConfigError.exit_code, "'nope'"),
        ("index {missing} --index {new}", ImageError.exit_code, "does not exist"),
        ("index {empty} --index {new}", LookalikeError.exit_code, "no images in"),
        ("remove --index {index}", ConfigError.exit_code, "--id"),
    ],
)
def test_user_errors_are_one_line(small_index, tmp_path, capsys, args, code, words):
    folder, index = small_index
    places = {
        "index": index,
        "folder": folder,
        "query": next(folder.iterdir()),
        "missing": tmp_path / "missing.jpg",
        "new": tmp_path / "new-index",
        "empty": tmp_path / "empty",
    }
    places["empty"].mkdir()
    rc, out, err = cli(capsys, *(arg.format(**places) for arg in args.split()))
    assert rc == code
    assert words in one_line_error(err)
    assert out == ""


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["index"]) == 2
    assert main(["search", "--index", "x", "-k", "-1"]) == 2
    assert "usage:" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "index" in capsys.readouterr().out


def test_keyboard_interrupt_exits_130(small_index, capsys, monkeypatch):
    import lookalike.indexing

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lookalike.indexing, "index_folder", interrupted)
    folder, index = small_index
    rc, _, err = cli(capsys, "index", folder, "--index", index)
    assert rc == 130
    assert "interrupted" in one_line_error(err)


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    done = subprocess.run(
        [*CLI, "info", "--index", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == IndexStateError.exit_code
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: index directory")
    assert "Traceback" not in done.stderr


def test_cli_module_imports_no_torch():
    code = "import sys, lookalike.cli as c; c.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_progress_bars_on_a_terminal(small_index, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as a terminal
    folder, index = small_index
    queries = sorted(folder.iterdir())[:2]
    rc, out, err = cli(capsys, "search", "--index", index, *queries, "--json", "-k", 1)
    assert rc == 0, err
    assert "searching" in err and "2/2" in err and "query/s" in err
    assert len(json_lines(out)) == 2  # results stay on stdout, bars on stderr
    for quiet in (["-q", "search"], ["search", "--quiet"]):  # before or after the command
        rc, out, err = cli(capsys, *quiet, "--index", index, *queries, "--json", "-k", 1)
        assert rc == 0 and err == "" and len(json_lines(out)) == 2


def test_search_box_and_rotations(small_index, tmp_path, capsys):
    folder, index = small_index
    indexed = sorted(folder.iterdir())  # 64 x 64 each
    queries = []
    for n, (a, b) in enumerate([(0, 1), (2, 3)]):  # two photos side by side
        pair = Image.new("RGB", (128, 64))
        pair.paste(Image.open(indexed[a]), (0, 0))
        pair.paste(Image.open(indexed[b]), (64, 0))
        queries.append(tmp_path / f"pair{n}.png")
        pair.save(queries[-1])

    def top(*args: object) -> list[tuple[str, float]]:
        rc, out, err = cli(capsys, "search", "--index", index, *args, "--json", "-k", 1)
        assert rc == 0, err
        firsts = [line["results"][0] for line in json_lines(out)]
        return [(Path(r["path"]).name, r["score"]) for r in firsts]

    # --box applies to every IMAGE given.
    left = top(*queries, "--box", "0,0,64,64", "--rotations", "0")
    assert [name for name, _ in left] == [indexed[0].name, indexed[2].name]
    assert all(score > 0.99 for _, score in left)
    right = top(*queries, "--box", "64,0,128,64", "--rotations", "0")
    assert [name for name, _ in right] == [indexed[1].name, indexed[3].name]

    # A query turned by 90 degrees is found upright only when that view is searched.
    turned = tmp_path / "turned.png"
    Image.open(indexed[1]).transpose(Image.Transpose.ROTATE_90).save(turned)
    ((_, upright_only),) = top(turned, "--rotations", "0")
    ((name, with_views),) = top(turned, "--rotations", "0,90,270")
    assert name == indexed[1].name
    assert with_views > upright_only + 0.1


def test_failed_files_are_listed_and_capped(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "broken"
    folder.mkdir()
    distinct_image(0, 64).save(folder / "good.png")
    for i in range(13):
        (folder / f"empty{i:02d}.jpg").write_bytes(b"")
    index = tmp_path / "index"
    rc, out, err = cli(capsys, "index", folder, "--index", index, "--workers", 0)
    assert rc == 0, err
    assert (summary(out)["added"], summary(out)["failed"]) == ("1", "13")
    listed = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(listed) == 11 and listed[-1].strip() == "... and 3 more"
    assert all("empty" in line and "0 bytes" in line for line in listed[:10])
    rc, out, _ = cli(capsys, "info", "--index", index)
    assert "1 ok, 13 error" in out and "failed files (13):" in out
    failed = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(failed) == 13 and all(str(folder.resolve()) in line for line in failed)
    import lookalike.cli.index_commands as commands

    monkeypatch.setattr(commands, "MAX_INFO_FAILED_SHOWN", 5)
    rc, out, _ = cli(capsys, "info", "--index", index)
    assert len([line for line in out.splitlines() if line.startswith("  [")]) == 5
    assert "... and 8 more (see --json)" in out


def test_verbose_logs_to_stderr_and_cleans_up(small_index, capsys):
    import logging

    folder, index = small_index
    handlers = list(logging.getLogger().handlers)
    rc, _, err = cli(capsys, "-v", "index", folder, "--index", index, "--workers", 0, "-q")
    assert rc == 0
    assert "INFO lookalike." in err
    assert logging.getLogger().handlers == handlers  # main() leaves logging as it found it
    rc, _, err = cli(capsys, "index", folder, "--index", index, "--workers", 0, "-q")
    assert rc == 0 and err == ""


def test_parse_box_and_rotations():
    assert parse_box("1,2.5, 30,40") == (1.0, 2.5, 30.0, 40.0)
    assert parse_rotations("0,90,270") == (0, 90, 270)
    for text in ("", "1,2,3,4,5", "1,2,1,5", "x,1,2,3"):
        with pytest.raises(ConfigError):
            parse_box(text)
    for text in ("", "0,30", "a"):
        with pytest.raises(ConfigError):
            parse_rotations(text)


def test_info_and_presets_human_output(small_index, capsys):
    _, index = small_index
    rc, out, _ = cli(capsys, "info", "--index", index)
    assert rc == 0
    fields = dict(re.findall(r"^(\w[\w ]*?) {2,}(.+)$", out, flags=re.MULTILINE))
    info = index_info(index)
    assert fields["index"] == f"{index.resolve()} (format 2)"
    assert fields["model"] == "efficientnet_lite0 (weights: packaged)"
    assert fields["weights"] == info["model"]["weights_hash"] and len(fields["weights"]) > 8
    assert fields["pooling"] == get_preset("default").pooling
    assert fields["images"] == "6 ok, 0 error"
    assert fields["backend"] == "faiss: Flat"
    rotations = list(get_preset("default").query_rotations)
    assert fields["queries"] == f"rotations {rotations}, crops none"
    assert fields["whitening"] == "not learned yet"
    assert "dba" not in fields  # never searched with dba (local features: cached by the
    #   verification that searches of this small index run by default)
    rc, out, _ = cli(capsys, "presets")
    assert rc == 0
    from lookalike.extract import EXTRACT_PRESETS
    from lookalike.index import INDEX_PRESETS
    from lookalike.local.conf import VERIFY_PRESETS
    from lookalike.rerank import STAGES

    tables: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        if not line.startswith(("│", "┃", "┏", "┡", "└")) and line.strip():
            title = line.split()[0]  # "extract presets (--preset)" ...
            tables[title] = []
        elif line.startswith("│"):
            tables[title].append([c.strip() for c in line.strip("│").split("│")])
    assert [row[0] for row in tables["extract"]] == list(EXTRACT_PRESETS)
    assert [row[0] for row in tables["index"]] == list(INDEX_PRESETS)
    assert [row[0] for row in tables["re-ranking"]] == list(STAGES)
    assert [row[0] for row in tables["verify"]] == list(VERIFY_PRESETS)
    fast = tables["extract"][list(EXTRACT_PRESETS).index("fast")]
    assert fast == ["fast", "efficientnet_lite0", "384", "1.0", "gem p=3.0", "off", "0", "off"]
    assert ["ivfpq", "faiss", "IVF1024,PQ32", "16", "128"] in tables["index"]
    sqrt = tables["verify"][list(VERIFY_PRESETS).index("sqrt-inliers")]
    assert sqrt[1] == "aliked" and sqrt[-1] == "sim_sqrt_inliers"
    dba_aqe = tables["re-ranking"][list(STAGES).index("dba+aqe")][1]
    assert dba_aqe.startswith("k=5 alpha=1.0 qe=(n=2 alpha=0.0")


# -- 6. eval ---------------------------------------------------------------------------------


def test_eval_on_a_labelled_folder(tmp_path, capsys):
    root = tmp_path / "tiny"
    for name in ("chelsea", "coffee", "rocket"):
        base = photo(name, 96)
        (root / name).mkdir(parents=True)
        base.save(root / name / "0.png")
        for k in (1, 2):
            near_duplicate(base, k).save(root / name / f"{k}.jpg")
    out_json = tmp_path / "out" / "result.json"
    rc, out, err = cli(
        capsys, "eval", "--dataset", "folder", "--root", root, "--workers", 0, "--json", out_json
    )
    assert rc == 0, err
    assert "mAP" in out and "mP@1" in out and "query_ms" in out
    result = json.loads(out_json.read_text())
    assert result["dataset"] == "tiny" and result["preset"] == "default"
    assert result["queries"] == 9 and result["metrics"]["queries"] == 9
    assert result["metrics"]["mAP"] == 100.0  # near-duplicates of three unrelated photos
    assert result["query_ms"] > 0
