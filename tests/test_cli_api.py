"""The command line is thin: for every command, ``--json`` prints exactly what the Python API's
one call returns on the same index (``json.dumps(result.to_dict())``, or the dict).

The CLI runs in-process (:func:`lookalike.cli.main`, captured output). Only timings may
differ between the two runs (:data:`TIMINGS`). The collection: three photos in labelled
sub-folders (two near-duplicates each) and one unlabelled photo, indexed with SIFT local
features so that ``--rerank verify`` needs no weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import near_duplicate, photo
from test_cli import cli, json_lines

from lookalike.cli import main
from lookalike.evaluate import evaluate
from lookalike.indexing import index_folder, index_info, remove_images, resolve_settings
from lookalike.labels import label_source
from lookalike.local.conf import local_conf
from lookalike.local.pair import match_files
from lookalike.presets import presets
from lookalike.query import Query
from lookalike.recognize import recognize
from lookalike.search import search

CLASSES = ("chelsea", "coffee", "rocket")
SIDE = 160  # large enough for SIFT keypoints, small enough to be quick
TIMINGS = {"seconds", "images_per_second", "query_ms", "index_seconds"}


def plain(value: object) -> object:
    """``value`` as JSON would give it back (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def without_timings(value: object) -> object:
    """``value`` with every timing field dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def same(cli_json: object, api_result: object) -> None:
    """The CLI's JSON equals the API's result, timings aside (which both must have)."""
    assert without_timings(cli_json) == without_timings(plain(api_result))


@pytest.fixture(autouse=True)
def not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"root", "queries", name: query}``: the labelled folder and one query per class."""
    base = tmp_path_factory.mktemp("api")
    root = base / "photos"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        photo(name, SIDE).save(root / name / "0.png")
        near_duplicate(photo(name, SIDE), 1).save(root / name / "1.jpg")
    photo("astronaut", SIDE).save(root / "loose.png")
    queries = base / "queries"
    queries.mkdir()
    out: dict[str, Path] = {"root": root, "queries": queries}
    for name in CLASSES:
        out[name] = queries / f"{name}.jpg"
        near_duplicate(photo(name, SIDE), 3).save(out[name])
    return out


INDEX_OPTIONS = {
    "labels-local": ["--label-from", "folder", "--local", "sift", "--local-side", str(SIDE)],
    "numpy": ["--backend", "numpy"],
}


def api_index(folder: Path, index: Path, variant: str) -> dict:
    """What ``lookalike index folder --index index OPTIONS`` runs, as Python."""
    settings = resolve_settings(index, workers=0, backend="numpy" if variant == "numpy" else None)
    labelled = variant == "labels-local"
    return index_folder(
        folder,
        index,
        settings.extract,
        settings.index,
        labels=label_source("folder", folder) if labelled else None,
        local=local_conf("sift", max_side=SIDE) if labelled else None,
    ).to_dict()


@pytest.fixture(scope="module")
def index(photos, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection indexed by the CLI (labels, SIFT local features); read-only."""
    path = tmp_path_factory.mktemp("api-index") / "index"
    argv = ["index", photos["root"], "--index", path, "--workers", 0, "-q"]
    assert main([str(a) for a in [*argv, *INDEX_OPTIONS["labels-local"]]]) == 0
    return path


def copy_of(index: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(index, tmp_path / name))


def one_json(capsys, *args: object) -> object:
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    return json.loads(out)


# -- index, remove, info, presets ---------------------------------------------------------------


@pytest.mark.parametrize("variant", list(INDEX_OPTIONS))
def test_index(photos, tmp_path, capsys, variant):
    root = photos["root"]
    options = INDEX_OPTIONS[variant]
    by_cli = one_json(capsys, "index", root, "--index", tmp_path / "a", "--workers", 0, "-q",
                      "--json", *options)  # fmt: skip
    by_api = api_index(root, tmp_path / "b", variant)
    same(by_cli, by_api)
    assert TIMINGS & set(by_cli) == {"seconds", "images_per_second"}
    assert by_cli["added"] == 7 and by_cli["failed"] == []
    if variant == "labels-local":
        assert (by_cli["labelled"], by_cli["classes"], by_cli["local_described"]) == (6, 3, 7)
    backend = "numpy" if variant == "numpy" else "faiss"
    assert index_info(tmp_path / "a")["backend"]["backend"] == backend
    assert index_info(tmp_path / "b")["backend"]["backend"] == backend
    # a second run: nothing to do, the same report either way
    again = one_json(capsys, "index", root, "--index", tmp_path / "a", "--workers", 0, "-q",
                     "--json", *options)  # fmt: skip
    same(again, api_index(root, tmp_path / "b", variant))
    assert again["unchanged"] == 7 and again["added"] == 0


def test_info(index, capsys):
    same(one_json(capsys, "info", "--index", index, "--json"), index_info(index))


def test_presets(capsys):
    by_cli = one_json(capsys, "presets", "--json")
    same(by_cli, presets())
    assert set(by_cli) == {"extract", "index", "rerank", "verify", "train", "loss"}


@pytest.mark.parametrize("by", ["ids", "paths"])
def test_remove(index, photos, tmp_path, capsys, by):
    a, b = copy_of(index, tmp_path, "a"), copy_of(index, tmp_path, "b")
    info = index_info(index)
    gone = [photos["root"] / "coffee" / "0.png", photos["root"] / "loose.png"]
    if by == "ids":
        with_ids = search(index, gone, k=1)
        ids = [answer.hits[0].id for answer in with_ids] + [999]
        by_cli = one_json(capsys, "remove", "--index", a, "--id", *ids, "--json")
        by_api = remove_images(b, ids=ids)
    else:
        by_cli = one_json(capsys, "remove", "--index", a, *gone, "--json")
        by_api = remove_images(b, paths=gone)
    same(by_cli, by_api.to_dict())
    assert by_cli["removed"] == 2
    after_a, after_b = index_info(a), index_info(b)
    assert after_a["counts"] == after_b["counts"] == {"ok": info["counts"]["ok"] - 2, "error": 0}
    assert after_a["local"]["images"] == after_b["local"]["images"] == info["local"]["images"] - 2


# -- search, recognize, match -------------------------------------------------------------------


def test_search_images(index, photos, capsys):
    queries = [photos["chelsea"], photos["rocket"]]
    rc, out, err = cli(capsys, "search", "--index", index, *queries, "-k", 3, "--json")
    assert rc == 0, err
    by_cli = json_lines(out)
    same(by_cli, [a.to_dict() for a in search(index, queries, k=3)])
    assert [line["query"] for line in by_cli] == [str(q) for q in queries]
    assert [Path(line["results"][0]["path"]).parent.name for line in by_cli] == [
        "chelsea",
        "rocket",
    ]
    # a failed query among good ones: its error in place, the others answered
    bad = photos["queries"] / "missing.jpg"
    rc, out, _ = cli(capsys, "search", "--index", index, queries[0], bad, "-k", 3, "--json")
    assert rc == 3
    answers = search(index, [queries[0], bad], k=3, errors="report")
    same(json_lines(out), [a.to_dict() for a in answers])
    assert answers[1].error is not None and set(json_lines(out)[1]) == {"query", "error"}


def test_search_by_id_box_and_rotations(index, photos, capsys):
    top = search(index, [photos["coffee"]], k=1)[0].hits[0]
    rc, out, err = cli(capsys, "search", "--index", index, "--id", top.id, "-k", 4, "--json")
    assert rc == 0, err
    (by_cli,) = json_lines(out)
    (by_api,) = search(index, [top.id], k=4)
    same(by_cli, by_api.to_dict())
    assert by_cli["query"] == top.path and by_cli["results"][0]["id"] == top.id
    box = (10, 10, 120, 100)
    rc, out, err = cli(capsys, "search", "--index", index, photos["coffee"], "--box",
                       "10,10,120,100", "--rotations", "0,90", "--json")  # fmt: skip
    assert rc == 0, err
    (by_api,) = search(index, [Query(image=photos["coffee"], box=box)], rotations=(0, 90))
    same(json_lines(out)[0], by_api.to_dict())


@pytest.mark.parametrize(
    ("options", "rerank", "verify"),
    [
        (["--rerank", "dba,alpha-qe"], ["dba", "alpha-qe"], None),
        (["--rerank", "verify"], ["verify"], None),
        (
            ["--rerank", "alpha-qe,verify", "--verify-budget", "2", "--fusion", "inliers"],
            ["alpha-qe", "verify"],
            {"budget": 2, "fusion": "inliers"},
        ),
    ],
)
def test_search_rerank(index, photos, tmp_path, capsys, options, rerank, verify):
    a, b = copy_of(index, tmp_path, "a"), copy_of(index, tmp_path, "b")  # dba.npz is stored
    queries = [photos["coffee"], photos["chelsea"]]
    rc, out, err = cli(capsys, "search", "--index", a, *queries, "-k", 4, "--json", *options)
    assert rc == 0, err
    by_cli = json_lines(out)
    by_api = search(b, queries, k=4, rerank=rerank, verify=verify)
    same(by_cli, [x.to_dict() for x in by_api])
    paths = {line["query"]: [r["path"] for r in line["results"]] for line in by_cli}
    assert all(Path(p[0]).parent.name == Path(q).stem for q, p in paths.items())
    if "verify" in rerank:
        budget = 2 if verify else 4
        verified = [["inliers" in r for r in line["results"]] for line in by_cli]
        assert verified == [[True] * budget + [False] * (4 - budget)] * 2
        assert all(line["results"][0]["inliers"] >= 10 for line in by_cli)
    # searching again answers the same (the DBA stored by the first search is reused)
    same(by_cli, [x.to_dict() for x in search(a, queries, k=4, rerank=rerank, verify=verify)])


@pytest.mark.parametrize(
    ("options", "kwargs", "labels"),
    [
        ([], {}, CLASSES),
        (
            ["-k", "3", "--p", "4", "--confidence", "share"],
            {"k": 3, "p": 4.0, "confidence": "share"},
            CLASSES,
        ),
        (  # the rocket photo is weakly textured: 9 inliers at 160 px, the others 40 and more
            ["--rerank", "verify", "--confidence", "inliers", "--min-confidence", "20"],
            {"rerank": ["verify"], "confidence": "inliers", "min_confidence": 20.0},
            ("chelsea", "coffee", None),
        ),
    ],
)
def test_recognize(index, photos, capsys, options, kwargs, labels):
    queries = [photos[name] for name in CLASSES]
    rc, out, err = cli(capsys, "recognize", "--index", index, *queries, "--json", *options)
    assert rc == 0, err
    by_cli = json_lines(out)
    by_api = recognize(index, queries, **kwargs)
    same(by_cli, [p.to_dict(str(q)) for q, p in zip(queries, by_api, strict=True)])
    assert [line["label"] for line in by_cli] == list(labels)
    assert [len(line["neighbours"]) for line in by_cli] == [min(kwargs.get("k", 10), 7)] * 3


def test_match(photos, tmp_path, capsys):
    a, b = photos["root"] / "coffee" / "0.png", photos["coffee"]
    png = tmp_path / "pair.png"
    by_cli = one_json(capsys, "match", a, b, "--local", "sift", "--out", png, "--json")
    by_api = match_files(a, b, local_conf("sift"), png)
    same(by_cli, by_api.to_dict())
    assert by_cli["inliers"] >= 10 and by_cli["png"] == str(png) and png.is_file()
    assert len(by_cli["model"]) == 3 and by_cli["keypoints"][0] > 0
    unrelated = one_json(capsys, "match", a, photos["rocket"], "--local", "sift", "--json")
    same(unrelated, match_files(a, photos["rocket"], local_conf("sift")).to_dict())
    assert unrelated["png"] is None and unrelated["inliers"] < by_cli["inliers"]


# -- eval ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "numpy"])
def test_eval(photos, tmp_path, capsys, backend):
    root = photos["root"]
    options = [] if backend is None else ["--backend", backend]
    out_json = tmp_path / "eval.json"
    rc, _, err = cli(capsys, "eval", "--dataset", "folder", "--root", root, "--workers", 0,
                       "--json", out_json, "-q", *options)  # fmt: skip
    assert rc == 0, err
    by_cli = json.loads(out_json.read_text())
    by_api = evaluate("folder", root, workers=0, backend=backend)
    same(by_cli, by_api)
    assert TIMINGS & set(by_cli) == {"index_seconds", "images_per_second", "query_ms"}
    assert by_cli["preset"] == "default" and by_cli["queries"] == 6  # loose.png: no query
    assert by_cli["index"]["backend"] == (backend or "faiss")
    assert by_cli["metrics"]["mAP"] == 100.0  # near-duplicates of unrelated photos
