"""One ``Searcher`` shared by several threads while another process changes the index.

Four threads search in a loop (stored vectors, ids and image files; plain and with
``dba`` + ``alpha-qe``) while a subprocess, through the Python API, adds and removes images
in several commits, checkpoints and compacts (the files readers use are replaced). Every
search must succeed and obey the contract, and once the writer is done every committed
change must be visible: removed ids never come back, added images are found by their own
vectors. Two races too narrow to hit by chance are forced by hand.
"""

from __future__ import annotations

import itertools
import json
import threading
import traceback

import numpy as np
import pytest
from conftest import write_images
from index_helpers import DESCRIPTOR, D, images, run_python, unit

from lookalike.index import IndexStore, NewImage
from lookalike.indexing import index_folder
from lookalike.local.conf import VerifyConf
from lookalike.ranking import Ranking
from lookalike.rerank import DBAState
from lookalike.search import Searcher

pytest_plugins = ("_fixtures",)

THREADS = 4
K = 5
REMOVED_ORIGINAL = 7  # row of the photo the writer removes (never an id query)

WRITER = """
import json, sys, time
import numpy as np
from lookalike.index import IndexStore, NewImage

root, removed_original = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(5)
kept, removed = {}, [removed_original]
with IndexStore.open(root, writable=True) as store:
    for round in range(5):
        x = rng.standard_normal((6, store.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = store.add([NewImage(path=f"/new/{round}-{i}.jpg") for i in range(6)], x)
        kept.update({i: v.tolist() for i, v in zip(ids, x)})
        time.sleep(0.05)
        gone = [ids[0], ids[3]] + ([removed_original] if round == 2 else [])
        store.remove(gone)
        removed += [i for i in gone if i in kept]
        for i in gone:
            kept.pop(i, None)
        if round == 1:
            store.checkpoint()  # readers switch to a new checkpoint file
        if round == 3:
            store.compact()  # and to a new vector file, the old one deleted
        time.sleep(0.05)
print(json.dumps({"kept": kept, "removed": sorted(set(removed))}))
"""


@pytest.fixture
def index(tmp_path, make_extractor):
    """Eight photos indexed with the small test model (1280-d, Flat, no whitening)."""
    extractor = make_extractor()
    paths = write_images(tmp_path / "images", 8, side=64)
    index_folder(tmp_path / "images", tmp_path / "index", extractor.conf, extractor=extractor)
    return tmp_path / "index", paths, extractor


def check_contract(ranking: Ranking, n: int) -> None:
    """Shapes, dtypes, best first, each id once, padding only at the end."""
    assert ranking.scores.shape == ranking.ids.shape == (n, K)
    assert ranking.scores.dtype == np.float32 and ranking.ids.dtype == np.int64
    for scores, ids in zip(ranking.scores, ranking.ids, strict=True):
        valid = ids >= 0
        m = int(valid.sum())
        assert valid[:m].all() and not valid[m:].any(), ids
        assert np.isneginf(scores[m:]).all() and np.isfinite(scores[:m]).all()
        assert np.all(np.diff(scores[:m]) <= 1e-6), scores
        assert len(set(ids[:m].tolist())) == m, ids


def test_shared_searcher_while_another_process_writes(index):
    root, paths, extractor = index
    errors: list[str] = []
    counts = [0] * THREADS
    done = threading.Event()
    with Searcher.open(root, rerank=["dba", "alpha-qe"], extractor=extractor) as reranked:
        plain = reranked.with_stages([])
        originals = [reranked.store.find_path(str(p.resolve())).id for p in paths]
        x = reranked.store.vectors(originals)
        stable = originals[:REMOVED_ORIGINAL]  # never removed: safe id queries
        reranked.search(stable[:1], k=K)  # the DBA is computed before the writer starts

        def work(t: int) -> None:
            rng = np.random.default_rng(t)
            i = 0
            try:
                while not done.is_set() or i < 3:
                    s = (plain, reranked)[i % 2]
                    row = int(rng.integers(0, len(stable)))
                    if i % 6 == 5:  # an image query now and then
                        queries: list = [paths[row], stable[row]]
                    else:
                        queries = [stable[row], x[row], x[REMOVED_ORIGINAL]]
                    ranking = s.search(queries, k=K)
                    check_contract(ranking, len(queries))
                    assert ranking.ids[0, 0] == ranking.ids[1, 0] == stable[row]
                    s.results(ranking)
                    i += 1
            except Exception:  # reported below, with its traceback
                errors.append(f"thread {t}, search {i}:\n{traceback.format_exc()}")
            counts[t] = i

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        writer = run_python(WRITER, str(root), str(originals[REMOVED_ORIGINAL]))
        for thread in threads:
            thread.start()
        try:
            out, err = writer.communicate(timeout=90)
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=60)
        assert writer.returncode == 0, err
        assert not errors, "\n".join(errors)
        assert all(c >= 3 for c in counts), counts
        print("searches per thread", counts)
        changes = json.loads(out)
        kept = {int(i): np.asarray(v, np.float32) for i, v in changes["kept"].items()}
        removed = set(changes["removed"])
        assert len(kept) == 20 and originals[REMOVED_ORIGINAL] in removed and len(removed) == 11

        # every committed change is visible to both searchers
        for s in (plain, reranked):
            assert len(s) == 8 - 1 + len(kept)
            found = s.search(list(kept.values()), k=K)
            assert found.ids[:, 0].tolist() == list(kept), s.stages
            everything = s.search([*x, *kept.values()], k=0)
            assert not removed & set(everything.ids.ravel().tolist())
            assert set(everything.ids[0].tolist()) == set(stable) | set(kept)
        state = reranked.resources.dba(5, 1.0)
        assert state.current().is_current() and set(state.current().ids.tolist()) == (
            set(stable) | set(kept)
        )


# -- races forced by hand ----------------------------------------------------------------------


@pytest.fixture
def vectors(tmp_path):
    with IndexStore.create(tmp_path / "index", DESCRIPTOR, D) as store:
        store.add(images(40), unit(40, seed=1))
    return tmp_path / "index"


def test_a_commit_between_the_dba_update_and_its_search(vectors, monkeypatch):
    """A writer committing right after every DBA update: searches still succeed (the DBA
    is current as of the update, as the first stage is as of the search's start)."""
    with Searcher.open(vectors, rerank=["dba", "aqe"]) as s:
        s.search([1], k=3)  # the DBA is computed and stored before the writer holds the lock
        with IndexStore.open(vectors, writable=True) as writer:
            current, n = DBAState.current, itertools.count()

            def then_commit(self: DBAState):  # type: ignore[no-untyped-def]
                index = current(self)
                i = next(n)
                writer.add([NewImage(path=f"/late/{i}.jpg")], unit(1, seed=100 + i))
                return index

            monkeypatch.setattr(DBAState, "current", then_commit)
            ranking = s.search([1, 2, 3], k=3)
            assert ranking.ids[:, 0].tolist() == [1, 2, 3] and next(n) == 3
            monkeypatch.undo()
            assert len(s.search([4], k=0).ids[0]) == 43  # the commits are all seen next


def test_a_brief_write_by_a_reader_keeps_unseen_commits_visible(vectors):
    """Storing what a search computed (a DBA, local features) takes the writer lock for a
    moment; commits another process made before must still be refreshed by the next search."""
    with Searcher.open(vectors) as s:
        s.search([1], k=1)
        with IndexStore.open(vectors, writable=True) as writer:
            (new,) = writer.add([NewImage(path="/late.jpg")], -unit(1, seed=1))
        with s.store.try_writer() as ok:
            assert ok
        assert s.search([-unit(1, seed=1)[0]], k=1).ids[0, 0] == new


def test_local_features_of_an_image_removed_while_it_is_described(vectors, monkeypatch):
    """Verification computes a candidate's missing features from its file; another process
    removing the image meanwhile must not fail the search."""
    from lookalike.local import provider

    with IndexStore.open(vectors) as store, IndexStore.open(vectors, writable=True) as writer:
        features = provider.IndexFeatures(store, VerifyConf(features="orb"), object(), cache=False)
        empty = features.of_ids([999])[0]  # an unknown id: empty features, nothing described

        def describe(local, st, ids, extractor, workers=2):  # type: ignore[no-untyped-def]
            writer.remove([ids[0]])
            return {i: empty for i in ids}, []

        monkeypatch.setattr(provider, "describe_into", describe)
        got = features.of_ids([3, 4])
        assert len(got) == 2 and all(len(f["keypoints"]) == 0 for f in got)
