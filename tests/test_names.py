"""File names that are not UTF-8 (``printf 'caf\\xe9.jpg'``) index, search, show and remove
like any other, beside a name holding a literal backslash that displays the same way; their
display form is ``caf\\xe9.jpg``, their bytes are kept, and rerunning ``index`` finds them
unchanged."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from lookalike.cli import main
from lookalike.index import IndexStore, NewImage
from lookalike.index.conf import display_path, fs_path_from_display
from lookalike.indexing import index_folder

LATIN1 = b"caf\xe9.png"  # not UTF-8
LITERAL = b"caf\\xe9.png"  # a backslash, an x, an e and a 9: displays like LATIN1
PLAIN = "plain.png"


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import distinct_image

    folder = tmp_path_factory.mktemp("names") / "photos"
    folder.mkdir()
    for i, name in enumerate((LATIN1, LITERAL, PLAIN.encode())):
        distinct_image(i).save(os.path.join(os.fsencode(folder), name), "PNG")
    return folder


def fs(folder: Path, name: bytes) -> str:
    return os.fsdecode(os.path.join(os.fsencode(folder.resolve()), name))


def test_display_forms() -> None:
    odd = os.fsdecode(b"/p/" + LATIN1)
    assert display_path(odd) == "/p/caf\\xe9.png" == display_path(b"/p/" + LATIN1)
    assert display_path("/p/café.png") == "/p/café.png"  # UTF-8 stays as it is
    assert display_path(os.fsdecode(b"/p/" + LITERAL)) == "/p/caf\\xe9.png"
    assert fs_path_from_display("/nowhere/caf\\xe9.png") == odd.replace("/p/", "/nowhere/")


def test_records_keep_the_bytes_and_show_the_display_form(root: Path) -> None:
    odd, literal = os.fsdecode(b"/p/" + LATIN1), os.fsdecode(b"/p/" + LITERAL)
    with IndexStore.create(root, {"model": "m"}, 4) as store:
        x = [[1, 0, 0, 0], [0, 1, 0, 0]]
        ids = store.add([NewImage(odd), NewImage(literal)], np.array(x, np.float32))
        again = store.add([NewImage(odd, error=f"cannot read {odd}")], None)
        assert again == ids[:1]  # the same file: an update, not a new image
        a, b = store.get(ids)
        assert a.path == b.path == "/p/caf\\xe9.png"  # shown alike...
        assert a.fs_path == odd and b.fs_path == literal  # ...opened apart
        assert a.raw_path == b"/p/" + LATIN1 and b.raw_path is None
        assert a.error == "cannot read /p/caf\\xe9.png"  # messages are stored displayable
        assert store.find_path(odd).id == ids[0] and store.find_path(literal).id == ids[1]
        assert store.remove_paths([odd]) == 1 and store.find_path(literal) is not None
    store = IndexStore.open(root, writable=True)
    with store, pytest.raises(ValueError, match="neither text nor file name bytes"):
        store.add([NewImage("/p/\ud800.png")], None)


def test_a_folder_with_odd_names_indexes_searches_shows_and_removes(
    odd_folder: Path, tmp_path: Path, default_extractor, capsys
) -> None:
    index = tmp_path / "index"
    report = index_folder(odd_folder, index, extractor=default_extractor)
    assert report.added == 3 and not report.failed, report.failed
    with IndexStore.open(index) as store:
        by_path = {r.fs_path: r for r in store.records()}
    odd, literal = fs(odd_folder, LATIN1), fs(odd_folder, LITERAL)
    assert set(by_path) == {odd, literal, fs(odd_folder, PLAIN.encode())}
    assert by_path[odd].path == by_path[literal].path == display_path(odd)

    capsys.readouterr()
    assert main(["info", "--index", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"ok": 3, "error": 0}
    odd_id = by_path[odd].id
    assert main(["search", "--index", str(index), "--id", str(odd_id), "--json", "-q"]) == 0
    (answer,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    hits = answer["results"]
    assert (
        answer["query"] == display_path(odd)
        and hits[0]["id"] == odd_id
        and hits[0]["path"] == display_path(odd)
    )

    from lookalike.query import Query
    from lookalike.search import Searcher

    with Searcher.open(index, extractor=default_extractor) as searcher:  # the file as a query
        assert searcher.search([Query(image=odd)], k=1).ids[0][0] == odd_id

    again = index_folder(odd_folder, index, extractor=default_extractor)
    assert again.unchanged == 3 and again.added == again.updated == 0

    assert main(["remove", "--index", str(index), odd]) == 0  # the name as the shell gives it
    with IndexStore.open(index) as store:
        assert store.find_path(odd) is None and store.find_path(literal) is not None
    conn = sqlite3.connect(index / "meta.sqlite")
    rows = conn.execute("SELECT path, raw_path FROM images ORDER BY id").fetchall()
    conn.close()
    assert all(raw is None for _, raw in rows) and len(rows) == 2
    again = index_folder(odd_folder, index, extractor=default_extractor)
    assert again.added == 1 and again.unchanged == 2
