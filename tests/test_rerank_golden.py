"""Every re-ranking pipeline through the one stage protocol gives the rankings the code before
the redesign gave (commit 0b54257), on a fixed index.

``tests/data/rerank_golden.npz`` holds those rankings (made by
``tests/golden/make_rerank_golden.py`` against that code): queries by id, through the old
``Searcher.search_ids_verified``, and by vector, through its ``_rank``, for each pipeline of
``rerank_fixture.PIPELINES`` (descriptor-space stages alone and composed, verification alone
and after them) at k = 5 and k = all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import rerank_fixture as fx

from lookalike.images import file_hash
from lookalike.index import IndexStore, NewImage
from lookalike.local.conf import VerifyConf
from lookalike.local.sync import sync_local
from lookalike.query import Query
from lookalike.search import Searcher

GOLDEN = Path(__file__).parent / "data" / "rerank_golden.npz"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    paths = fx.write_files(root / "images")
    images = []
    for path in paths:
        data, st = path.read_bytes(), path.stat()
        with Image.open(path) as img:
            w, h = img.size
        images.append(NewImage(str(path), file_hash(data), st.st_size, st.st_mtime, w, h))
    with IndexStore.create(root / "index", fx.DESCRIPTOR, fx.D) as store:
        store.add(images, fx.vectors())
        store.checkpoint()
        sync_local(store, VerifyConf(**fx.VERIFY), workers=0)
    return root / "index"


@pytest.fixture(scope="module")
def searcher(index: Path):
    with Searcher.open(index, verify=VerifyConf(**fx.VERIFY)) as s:
        yield s


def _check(got, golden: dict, key: str, inliers: bool) -> None:
    np.testing.assert_array_equal(got.ids, golden[f"{key}|ids"], err_msg=key)
    np.testing.assert_allclose(got.scores, golden[f"{key}|scores"], rtol=0, atol=1e-6)
    if inliers:
        expected = golden[f"{key}|inliers"]
        found = got.inliers if got.inliers is not None else np.full_like(expected, -1)
        np.testing.assert_array_equal(found, expected, err_msg=key)


@pytest.mark.parametrize("k", fx.K_VALUES)
@pytest.mark.parametrize("pipeline", fx.PIPELINES, ids=lambda p: ",".join(p) or "none")
def test_id_queries_rank_as_before(searcher, golden, pipeline, k) -> None:
    name = ",".join(pipeline) or "none"
    s = searcher.with_stages(pipeline, VerifyConf(**fx.VERIFY))
    got = s.search([Query(id=i) for i in fx.ID_QUERIES], k)
    _check(got, golden, f"id|{name}|{k}", inliers=True)


@pytest.mark.parametrize("k", fx.K_VALUES)
@pytest.mark.parametrize(
    "pipeline", [p for p in fx.PIPELINES if "verify" not in p], ids=lambda p: ",".join(p) or "none"
)
def test_vector_queries_rank_as_before(searcher, golden, pipeline, k) -> None:
    name = ",".join(pipeline) or "none"
    got = searcher.with_stages(pipeline).search(list(fx.vector_queries()), k)
    _check(got, golden, f"vector|{name}|{k}", inliers=False)


def test_the_pipelines_really_differ(golden) -> None:
    """The fixture moves results: a golden test over identical rankings would prove little."""
    base = golden["id|none|5|ids"]
    for pipeline in ("aqe", "dba", "dba,alpha-qe", "verify", "dba,alpha-qe,verify"):
        assert not np.array_equal(golden[f"id|{pipeline}|5|ids"], base), pipeline
    assert (golden["id|verify|5|inliers"] > 20).any()
