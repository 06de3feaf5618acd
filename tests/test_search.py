"""Searcher: query defaults recorded in the index, rotation fusion, joins to records."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_images

from lookalike.errors import ConfigError
from lookalike.extract import get_preset
from lookalike.indexing import index_folder
from lookalike.search import Searcher, hit_to_dict


@pytest.fixture(scope="module")
def upright_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    folder = root / "images"
    paths = write_images(folder, 6, side=96)
    conf = get_preset("upright").replace(workers=0)
    index_folder(folder, root / "index", conf)
    return root / "index", paths


def test_index_records_its_query_defaults(upright_index):
    index, _ = upright_index
    with Searcher(index) as s:
        assert s.conf.query_rotations == (0,)
        assert s.store.settings["query_rotations"] == [0]


def test_search_files_finds_itself_and_joins_records(upright_index):
    index, paths = upright_index
    with Searcher(index) as s:
        scores, ids = s.search_files(paths[:2], k=3)
        assert scores.shape == ids.shape == (2, 3)
        assert scores.dtype == np.float32 and ids.dtype == np.int64
        hits = s.results(scores, ids)
        assert [h[0].path for h in hits] == [str(p.resolve()) for p in paths[:2]]
        assert hits[0][0].score > 0.99 and hits[0][0].rank == 1
        assert np.all(np.diff(scores, axis=1) <= 0)
        assert set(hit_to_dict(hits[0][0])) == {"rank", "id", "path", "score"}
        # k = 0: the whole index, every id once
        _, all_ids = s.search_files(paths[:1], k=0)
        assert sorted(all_ids[0].tolist()) == sorted(r.id for r in s.store.records())


def test_rotated_query_found_only_with_rotations(upright_index, tmp_path):
    from PIL import Image

    index, paths = upright_index
    rotated = tmp_path / "rot.png"
    Image.open(paths[3]).rotate(90, expand=True).save(rotated)
    with Searcher(index) as s:
        target = s.store.find_path(str(paths[3].resolve())).id
        scores, ids = s.search_files([rotated], k=1, rotations=(0, 90, 270))
        assert ids[0, 0] == target
        # the match came from a rotated view: its score carries the rotation penalty
        assert scores[0, 0] == pytest.approx(1.0 - s.conf.rotation_penalty, abs=0.01)


def test_search_vectors_checks_shape(upright_index):
    index, _ = upright_index
    with Searcher(index) as s:
        with pytest.raises(ConfigError):
            s.search_vectors(np.zeros((1, 7), np.float32))
        scores, ids = s.search_ids([1], k=2)
        assert ids[0, 0] == 1 and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_mismatched_extractor_refused(upright_index):
    index, _ = upright_index
    # the fast preset pools and sizes differently from the index's descriptor
    with pytest.raises(ConfigError, match="differ"):
        Searcher(index, extractor=_FakeExtractor(get_preset("fast")))


class _FakeExtractor:
    def __init__(self, conf):
        self.conf = conf


def test_reindexing_a_changed_file_keeps_its_metadata(tmp_path):
    folder = tmp_path / "images"
    paths = write_images(folder, 3, side=64)
    conf = get_preset("fast").replace(workers=0)
    index_folder(folder, tmp_path / "index", conf, metadata=lambda p: {"label": p.stem})
    write_images(folder, 1, side=80)  # rewrites the first file with other content
    report = index_folder(folder, tmp_path / "index", conf)  # no metadata source this time
    assert report.updated == 1
    with Searcher(tmp_path / "index") as s:
        rec = s.store.find_path(str(paths[0].resolve()))
        assert rec.metadata == {"label": paths[0].stem}


@pytest.mark.parametrize("stages", [["aqe"], ["alpha-qe"], ["dba"], ["dba", "alpha-qe"]])
def test_rerank_stages_keep_the_contract(upright_index, stages):
    index, paths = upright_index
    with Searcher(index) as s:
        scores, ids = s.search_files(paths[:1], k=4, rerank=stages)
        assert scores.shape == ids.shape == (1, 4)
        assert ids[0, 0] == s.store.find_path(str(paths[0].resolve())).id
        assert len(set(ids[0].tolist())) == 4 and np.all(np.diff(scores[0]) <= 1e-6)
        _, id_ids = s.search_ids([int(ids[0, 0])], k=4, rerank=stages)
        assert id_ids[0, 0] == ids[0, 0]


def test_unknown_rerank_stage_is_refused(upright_index):
    index, paths = upright_index
    with Searcher(index) as s, pytest.raises(ConfigError, match="alpha-qe"):
        s.search_files(paths[:1], k=2, rerank=["nope"])


def test_stored_dba_follows_reindexing(tmp_path):
    from lookalike.index import IndexStore
    from lookalike.rerank.dba import DBAIndex, build_dba

    folder = tmp_path / "images"
    write_images(folder, 5, side=64)
    conf = get_preset("fast").replace(workers=0)
    index_folder(folder, tmp_path / "index", conf)
    with IndexStore.open(tmp_path / "index", writable=True) as store:
        build_dba(store).save()
    write_images(folder / "more", 2, side=72)
    index_folder(folder, tmp_path / "index", conf)  # adds 2: the stored DBA must follow
    with IndexStore.open(tmp_path / "index") as store:
        dba = DBAIndex.load(store)
        assert dba is not None and dba.is_current() and len(dba) == 7
