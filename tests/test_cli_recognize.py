"""``lookalike index --label-from`` and ``lookalike recognize``, end to end.

The gallery: three photos, each as three near-duplicates in a sub-folder named after it
(the label), and one unlabelled photo directly in the folder (a distractor). Queries are
other near-duplicates of the gallery photos, and one photo that is not in it. The ``fast``
preset (no whitening to learn) keeps indexing quick; the labels do not depend on it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import distinct_image, near_duplicate, photo
from test_cli import cli, json_lines, one_line_error, summary

from lookalike.cli import main
from lookalike.cli.query_commands import (
    CONFIDENCE_CHOICES,
    DEFAULT_CONFIDENCE,
    DEFAULT_K,
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_P,
)
from lookalike.errors import ConfigError, IndexStateError
from lookalike.index import IndexStore

CLASSES = ("chelsea", "coffee", "rocket")  # gallery sub-folders = labels
FAST = ("--preset", "fast", "--workers", "0", "-q")


@dataclass(frozen=True)
class Gallery:
    root: Path  # the labelled image folder
    index: Path  # its index, made by `lookalike index --label-from folder` (read-only)
    out: str  # what that command printed
    queries: dict[str, Path]  # CLASSES' near-duplicates, and "nothing" (not in the gallery)


def write_gallery(root: Path) -> Path:
    """CLASSES as sub-folders of three near-duplicates, and an unlabelled photo in ``root``."""
    for name in CLASSES:
        base = photo(name, 96)
        (root / name).mkdir(parents=True)
        base.save(root / name / "0.png")
        for k in (1, 2):
            near_duplicate(base, k).save(root / name / f"{k}.jpg")
    distinct_image(6, 96).save(root / "loose.png")  # "camera": in no class
    return root


@pytest.fixture(autouse=True)
def not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured output is no terminal, whatever the CI says: no progress bars, no colours."""
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    base = tmp_path_factory.mktemp("gallery")
    root = write_gallery(base / "photos")
    (base / "queries").mkdir()
    queries = {name: base / "queries" / f"{name}.jpg" for name in CLASSES}
    for name, path in queries.items():
        near_duplicate(photo(name, 96), 3).save(path)
    queries["nothing"] = base / "queries" / "nothing.png"
    distinct_image(1, 96).save(queries["nothing"])  # "astronaut"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            ["index", str(root), "--index", str(base / "index"), "--label-from", "folder", *FAST]
        )
    assert rc == 0, out.getvalue()
    return Gallery(root, base / "index", out.getvalue(), queries)


def copy_index(gallery: Gallery, tmp_path: Path) -> Path:
    """A writable copy of the gallery index (same image paths)."""
    return Path(shutil.copytree(gallery.index, tmp_path / "index"))


def stored_labels(index: Path, root: Path) -> dict[str, dict]:
    """``{path relative to root: metadata}`` of every indexed image."""
    with IndexStore.open(index) as store:
        return {
            Path(r.path).relative_to(root.resolve()).as_posix(): r.metadata for r in store.records()
        }


def table_rows(out: str) -> dict[str, list[str]]:
    """The first line of each row of the ``recognize`` table, by image file name."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)[1:-1]]
        if cells and cells[0]:
            rows[Path(cells[0]).name] = cells[1:]
    return rows


# -- labelling -------------------------------------------------------------------------------


def test_index_labels_from_folder(gallery):
    s = summary(gallery.out)
    assert (s["added"], s["relabelled"], s["labelled"]) == ("10", "0", "9 images, 3 classes")
    expected = {f"{c}/{f}": {"label": c} for c in CLASSES for f in ("0.png", "1.jpg", "2.jpg")}
    assert stored_labels(gallery.index, gallery.root) == {**expected, "loose.png": {}}


def test_csv_labels_a_new_index_and_relabel_it(tmp_path, capsys):
    folder = tmp_path / "photos"
    for sub, name in (("a", "chelsea"), ("b", "coffee")):
        (folder / sub).mkdir(parents=True)
        photo(name, 96).save(folder / sub / "0.png")
        near_duplicate(photo(name, 96), 1).save(folder / sub / "1.jpg")
    photo("rocket", 96).save(folder / "c.png")
    index = tmp_path / "index"

    first = tmp_path / "first.csv"  # relative paths: against DIR
    first.write_text("path,label\na/0.png,cat\na/1.jpg,cat\nb/0.png,cup\n")
    rc, out, err = cli(capsys, "index", folder, "--index", index, "--label-from", first, *FAST)
    assert rc == 0, err
    s = summary(out)
    assert (s["added"], s["relabelled"], s["labelled"]) == ("5", "0", "3 images, 2 classes")
    assert stored_labels(index, folder) == {
        "a/0.png": {"label": "cat"},
        "a/1.jpg": {"label": "cat"},
        "b/0.png": {"label": "cup"},
        "b/1.jpg": {},
        "c.png": {},
    }

    # The images are unchanged, so only the relabelling touches them: 5 labels change.
    second = tmp_path / "second.csv"
    rows = ["a/0.png,kitty,x", "a/1.jpg,kitty,", "b/1.jpg,cup,", f"{folder / 'c.png'},rocket,"]
    second.write_text("\n".join(["path,label,note", *rows, "b/0.png,,unlabelled"]) + "\n")
    rc, out, err = cli(capsys, "index", folder, "--index", index, "--label-from", second, *FAST)
    assert rc == 0, err
    s = summary(out)
    assert (s["added"], s["unchanged"], s["relabelled"]) == ("0", "5", "5")
    assert s["labelled"] == "4 images, 3 classes"
    assert stored_labels(index, folder) == {
        "a/0.png": {"label": "kitty"},
        "a/1.jpg": {"label": "kitty"},
        "b/0.png": {},
        "b/1.jpg": {"label": "cup"},
        "c.png": {"label": "rocket"},
    }

    query = tmp_path / "query.jpg"
    near_duplicate(photo("chelsea", 96), 3).save(query)
    rc, out, err = cli(capsys, "recognize", "--index", index, query, "--json", "-k", 3)
    assert rc == 0, err
    (line,) = json_lines(out)
    assert line["label"] == "kitty"
    assert line["neighbours"][0]["metadata"] == {"label": "kitty"}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "not found"),
        ("path,name\nchelsea/0.png,cat\n", "no 'label' column"),
        ("path,label\n,cat\n", "empty path"),
        ("path,label\nchelsea/0.png,cat\nchelsea/0.png,dog\n", "one label per image"),
    ],
)
def test_bad_label_file_is_one_line_before_any_work(gallery, tmp_path, capsys, content, words):
    labels = tmp_path / "labels.csv"
    if content is not None:
        labels.write_text(content)
    index = tmp_path / "index"
    rc, out, err = cli(capsys, "index", gallery.root, "--index", index, "--label-from", labels)
    assert rc == ConfigError.exit_code
    line = one_line_error(err)
    assert words in line and str(labels) in line
    assert out == ""
    assert not index.exists()  # refused before the index was created


# -- recognize -------------------------------------------------------------------------------


def test_recognize_json(gallery, capsys):
    query = gallery.queries["chelsea"]
    rc, out, err = cli(capsys, "recognize", "--index", gallery.index, query, "--json", "-k", 5)
    assert rc == 0, err
    assert err == ""
    (line,) = json_lines(out)
    assert list(line) == ["image", "label", "confidence", "votes", "neighbours"]
    assert line["image"] == str(query)
    assert line["label"] == "chelsea"

    neighbours = line["neighbours"]
    assert [n["rank"] for n in neighbours] == [1, 2, 3, 4, 5]
    root = gallery.root.resolve()
    for n in neighbours:
        labelled = Path(n["path"]).parent != root
        assert set(n) == {"rank", "id", "path", "score", *(["metadata"] if labelled else [])}
        if labelled:
            assert n["metadata"] == {"label": Path(n["path"]).parent.name}
    assert [Path(n["path"]).parent.name for n in neighbours[:3]] == ["chelsea"] * 3
    scores = [n["score"] for n in neighbours]
    assert scores == sorted(scores, reverse=True)

    # votes: every labelled neighbour adds max(score, 0) ** 8 to its label (default p = 8);
    # the confidence (default: vote) is the winning vote ** (1 / 8).
    expected: dict[str, float] = {}
    for n in neighbours:
        if "metadata" in n:
            label = n["metadata"]["label"]
            expected[label] = expected.get(label, 0.0) + max(n["score"], 0.0) ** 8
    assert all(isinstance(v, list) and len(v) == 2 for v in line["votes"])
    assert [label for label, _ in line["votes"]] == sorted(expected, key=lambda k: -expected[k])
    assert dict(line["votes"]) == pytest.approx(expected, rel=1e-4)
    assert line["confidence"] == pytest.approx(line["votes"][0][1] ** (1 / 8))


# "inliers" needs verification, which 96 px images are too small for: tests/test_verify.py
@pytest.mark.parametrize("method", [m for m in CONFIDENCE_CHOICES if m != "inliers"])
def test_every_confidence_ranks_lookalikes_above_strangers(gallery, capsys, method):
    images = [gallery.queries[name] for name in (*CLASSES, "nothing")]
    args = ("recognize", "--index", gallery.index, *images, "--json", "--confidence", method)
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    lines = json_lines(out)
    assert [line["image"] for line in lines] == [str(p) for p in images]
    assert [line["label"] for line in lines[:3]] == list(CLASSES)
    assert min(line["confidence"] for line in lines[:3]) > lines[3]["confidence"]


def test_min_confidence_abstains(gallery, capsys):
    query = gallery.queries["chelsea"]
    rc, out, _ = cli(capsys, "recognize", "--index", gallery.index, query, "--json")
    (sure,) = json_lines(out)
    assert sure["label"] == "chelsea" and sure["confidence"] < 0.99999
    rc, out, err = cli(
        capsys, "recognize", "--index", gallery.index, query, "--json", "--min-confidence", 0.99999
    )
    assert rc == 0, err
    (line,) = json_lines(out)
    assert line["label"] is None
    assert line["confidence"] == pytest.approx(sure["confidence"])
    assert [label for label, _ in line["votes"]] == [label for label, _ in sure["votes"]]
    assert len(line["neighbours"]) == len(sure["neighbours"]) == DEFAULT_K


def test_recognize_table(gallery, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal, so bars are drawn
    images = [gallery.queries[name] for name in ("chelsea", "coffee", "nothing")]
    args = ("--confidence", "top1", "--min-confidence", 0.7)
    rc, out, err = cli(capsys, "recognize", "--index", gallery.index, *images, *args)
    assert rc == 0, err
    assert "recognizing" in err and "3/3" in err
    rows = table_rows(out)
    assert rows["chelsea.jpg"][0] == "chelsea"
    assert rows["coffee.jpg"][0] == "coffee"
    assert rows["nothing.png"][0] == "-"  # top1 about 0.5 < 0.7: abstains
    assert 0.7 < float(rows["chelsea.jpg"][1]) < 1
    assert re.fullmatch(r"chelsea 0\.\d{4} chelsea/\d\.(png|jpg)", rows["chelsea.jpg"][2])


def test_recognize_warns_without_labels(gallery, tmp_path, capsys):
    index = copy_index(gallery, tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    rc, out, err = cli(capsys, "index", gallery.root, "--index", index, "--label-from", empty)
    assert rc == 0
    assert summary(out)["relabelled"] == "9" and summary(out)["labelled"] == "0 images, 0 classes"
    assert err.count("\n") == 1 and err.startswith("warning: --label-from")

    query = gallery.queries["chelsea"]
    rc, out, err = cli(capsys, "recognize", "--index", index, query, "--json", "-k", 3)
    assert rc == 0
    assert err.count("\n") == 1 and err.startswith("warning: index ")
    assert "no labelled image" in err
    (line,) = json_lines(out)
    assert (line["label"], line["confidence"], line["votes"]) == (None, 0.0, [])
    assert len(line["neighbours"]) == 3


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        ("--p 0", ConfigError.exit_code, "exponent"),
        ("--min-confidence nan", ConfigError.exit_code, "finite"),
        ("--box 1,2,3", ConfigError.exit_code, "--box"),
        ("--index {missing}", IndexStateError.exit_code, "missing"),
        ("--confidence inliers", ConfigError.exit_code, "--rerank verify"),
    ],
)
def test_recognize_user_errors_are_one_line(gallery, tmp_path, capsys, args, code, words):
    argv = f"recognize --index {gallery.index} {gallery.queries['chelsea']} {args}"
    rc, out, err = cli(capsys, *argv.format(missing=tmp_path / "missing").split())
    assert rc == code
    assert words in one_line_error(err)
    assert out == ""


@pytest.mark.parametrize("args", ["", "-k 0", "--confidence nope", "--p x", "--box"])
def test_recognize_usage_errors_exit_2(gallery, capsys, args):
    query = gallery.queries["chelsea"] if args else ""
    argv = f"recognize --index {gallery.index} {query} {args}".split()
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_defaults_are_the_library_defaults():
    from lookalike import recognize

    assert tuple(recognize.CONFIDENCE) == CONFIDENCE_CHOICES
    assert DEFAULT_CONFIDENCE == recognize.DEFAULT_CONFIDENCE
    assert (DEFAULT_K, DEFAULT_P) == (recognize.DEFAULT_K, recognize.DEFAULT_P)
    default = inspect.signature(recognize.Recognizer).parameters["min_confidence"].default
    assert default == DEFAULT_MIN_CONFIDENCE
