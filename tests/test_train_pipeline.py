"""The one-command loop: ``lookalike train DATA --out M --index I`` trains, describes the
index again into a new one (same ids, paths, labels), compares both and promotes or reports
a regression; and what it is built from: re-embedding, parent-folder labels, the gallery
metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_train_loop import CLASSES, PER_CLASS, write_labelled

from lookalike.cli import main
from lookalike.errors import ConfigError
from lookalike.evaluate.labelled import gallery_metrics
from lookalike.index import IndexStore
from lookalike.labels import labels_from_parent
from lookalike.search import Answer, Hit

TINY_ARGS = [
    "--sizes", "64:2", "--freeze-epochs", "1", "--batch-size", "8", "--index-size", "64",
    "--dim", "32", "--val-fraction", "0.25", "--workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def labelled_index(tmp_path_factory: pytest.TempPathFactory, default_extractor):
    """``(folder, index)``: the labelled folder indexed with the default preset, labels by
    parent folder, one image removed afterwards (so the ids have a gap)."""
    from lookalike.indexing import index_folder, remove_images

    base = tmp_path_factory.mktemp("pipeline")
    folder = write_labelled(base / "data")
    index = base / "index"
    index_folder(
        folder,
        index,
        default_extractor.conf,
        extractor=default_extractor,
        labels=labels_from_parent(folder),
    )
    remove_images(index, ids=[3])
    return folder, index


def records(index: Path) -> list[tuple[int, str, dict]]:
    with IndexStore.open(index) as store:
        return sorted((r.id, r.path, r.metadata) for r in store.records())


def test_labels_from_the_parent_folder(tmp_path: Path) -> None:
    (tmp_path / "Fruit" / "Apple" / "Granny-Smith").mkdir(parents=True)
    label = labels_from_parent(tmp_path)
    assert label(tmp_path / "Fruit" / "Apple" / "Granny-Smith" / "a.jpg") == {
        "label": "Granny-Smith"
    }
    assert label(tmp_path / "top.jpg") == {}
    assert label(Path("/elsewhere/x/a.jpg")) == {}


def test_train_with_index_writes_both_indexes_and_the_table(
    labelled_index, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, index = labelled_index
    before = records(index)
    out, new = tmp_path / "model", tmp_path / "new.idx"
    code = main(["-q", "train", str(folder), "--out", str(out), "--index", str(index),
                 "--new-index", str(new), *TINY_ARGS])  # fmt: skip
    printed = capsys.readouterr().out
    assert code in (0, 1)  # promoted, or a regression reported
    for word in ("epoch  1", "before", "after", "P@1", "mAP", "recognition", str(new)):
        assert word in printed, word
    assert ("use " in printed) == (code == 0) and ("regression" in printed) == (code == 1)
    assert records(index) == before  # the old index is untouched
    assert records(new) == before  # same ids (with the gap), paths, labels and metadata
    with IndexStore.open(new) as store:
        assert store.manifest.descriptor["pooling"] == "trained"
        assert store.dim == 32
    assert len(before) == CLASSES * PER_CLASS - 1


def test_the_json_outcome_and_the_default_new_index(labelled_index, tmp_path: Path, capsys) -> None:
    from lookalike.train.pipeline import default_new_index

    folder, index = labelled_index
    out = tmp_path / "m2"
    code = main(["-q", "train", str(folder), "--out", str(out), "--index", str(index),
                 "--json", *TINY_ARGS])  # fmt: skip
    outcome = json.loads(capsys.readouterr().out)
    new = default_new_index(index, out)
    try:
        assert outcome["new_index"] == str(new) and new.is_dir()
        assert outcome["promoted"] is (code == 0)
        for side in ("before", "after"):
            assert outcome[side]["queries"] == CLASSES * 2
            assert 0 <= outcome[side]["p_at_1"] <= 1 and 0 <= outcome[side]["map"] <= 1
    finally:
        import shutil

        shutil.rmtree(new)


def test_an_index_without_labels_is_refused_before_training(
    small_index, tmp_path: Path, capsys
) -> None:
    _folder, index = small_index
    data = write_labelled(tmp_path / "data")
    code = main(["train", str(data), "--out", str(tmp_path / "m"), "--index", str(index),
                 *TINY_ARGS])  # fmt: skip
    assert code == 2
    assert "has no labels" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_reembedding_into_the_same_directory_is_refused(labelled_index) -> None:
    from lookalike.extract import get_preset
    from lookalike.indexing.reembed import reembed_index

    _, index = labelled_index
    with pytest.raises(ConfigError, match="another directory"):
        reembed_index(index, index, get_preset("default"))


def test_train_without_index_prints_the_epochs(tmp_path: Path, capsys) -> None:
    data = write_labelled(tmp_path / "data", classes=2, per_class=8)
    code = main(["-q", "train", str(data), "--out", str(tmp_path / "m"), *TINY_ARGS])
    printed = capsys.readouterr().out
    assert code == 0
    assert "best epoch" in printed and "epoch  2" in printed


def _hit(rank: int, path: str, label: str | None, score: float) -> Hit:
    return Hit(rank, rank, path, score, {} if label is None else {"label": label})


class FakeSearcher:
    """Answers fixed rankings, as Searcher.answer does."""

    def __init__(self, rankings: dict[str, list[Hit]]) -> None:
        self.rankings = rankings

    def answer(self, queries, k=0, errors="raise"):
        from lookalike.errors import ImageError

        return [
            Answer(q, [], ImageError("unreadable"))
            if q not in self.rankings
            else Answer(q, self.rankings[q])
            for q in queries
        ]


def test_gallery_metrics_by_hand() -> None:
    # q1 (label a): ranking a, b, a -> P@1 1, AP = (1/1 + 2/3) / 2, AP@R (R=2) = 1/2
    # q2 (label b): ranking a, b, a -> P@1 0, AP = 1/2 = AP@R (R = 1: 0 in the first 1) ...
    rankings = {
        "/q1": [_hit(1, "/g1", "a", 0.9), _hit(2, "/g2", "b", 0.8), _hit(3, "/g3", "a", 0.1)],
        "/q2": [_hit(1, "/g1", "a", 0.9), _hit(2, "/g2", "b", 0.8), _hit(3, "/g3", "a", 0.1)],
        "/q3": [_hit(1, "/g1", "a", 0.9)],  # label c: not in the gallery
    }
    report = gallery_metrics(
        FakeSearcher(rankings), ["/q1", "/q2", "/q3", "/bad"], ["a", "b", "c", "a"], ks=(1, 2)
    )
    assert report.queries == 2 and report.unknown == 1
    assert [f["query"] for f in report.failed] == ["/bad"]
    assert report.p_at_1 == pytest.approx(0.5)
    assert report.map == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert report.map_at_r == pytest.approx((1 / 2 + 0) / 2)
    assert report.recall_at == {1: pytest.approx(0.5), 2: pytest.approx(1.0)}
    # recognition: q1's vote is a (0.9^3 + 0.1^3 > 0.8^3), q2's too (wrong)
    assert report.accuracy == pytest.approx(0.5)


def test_gallery_metrics_drop_the_query_s_own_file(tmp_path: Path) -> None:
    own = str((tmp_path / "q.jpg").resolve())
    rankings = {own: [_hit(1, own, "b", 1.0), _hit(2, "/g", "a", 0.5)]}
    report = gallery_metrics(FakeSearcher(rankings), [own], ["a"])
    assert report.p_at_1 == 1.0 and report.map == 1.0
    assert np.isclose(report.accuracy, 1.0)


def test_eval_measures_a_labelled_folder(tmp_path: Path, capsys) -> None:
    data = write_labelled(tmp_path / "data")
    out = tmp_path / "eval.json"
    code = main(["-q", "eval", "--dataset", "labelled", "--root", str(data), "--preset", "fast",
                 "--index", str(tmp_path / "idx"), "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert result["images"] == CLASSES * PER_CLASS and result["classes"] == CLASSES
    assert set(result["metrics"]) == {"R@1", "R@5", "R@10", "R-precision", "mAP@R", "NMI"}
    assert all(0 <= v <= 100 for v in result["metrics"].values())
    # crops of one photo per class: off-the-shelf descriptors already separate them
    assert result["metrics"]["R@1"] > 80
    assert len(result["worst"]) == CLASSES and "worst classes" in printed
    with IndexStore.open(tmp_path / "idx") as store:  # labelled by parent folder
        assert {r.metadata["label"] for r in store.records()} == {
            f"class{c}" for c in range(CLASSES)
        }


def test_an_index_labelled_otherwise_is_refused_before_training(
    tmp_path: Path, default_extractor, capsys
) -> None:
    from lookalike.indexing import index_folder
    from lookalike.labels import labels_from_folder

    data = write_labelled(tmp_path / "data")
    index = tmp_path / "idx"  # labelled by the first sub-folder: even / odd
    index_folder(data, index, default_extractor.conf, extractor=default_extractor,
                 labels=labels_from_folder(data))  # fmt: skip
    code = main(["train", str(data), "--out", str(tmp_path / "m"), "--index", str(index),
                 *TINY_ARGS])  # fmt: skip
    assert code == 2
    assert "none is a training class" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_interrupted_reembedding_resumes_to_the_same_index(
    labelled_index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lookalike.extract import get_preset
    from lookalike.index.writer import WriterMixin
    from lookalike.indexing.reembed import reembed_index

    _, index = labelled_index
    conf = get_preset("fast").replace(workers=0)
    clean = tmp_path / "clean"
    reembed_index(index, clean, conf, chunk=8)
    real, calls = WriterMixin.add, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the second chunk
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WriterMixin, "add", failing)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        reembed_index(index, resumed, conf, chunk=8)
    assert len(records(resumed)) == 8
    monkeypatch.setattr(WriterMixin, "add", real)
    report = reembed_index(index, resumed, conf, chunk=8)
    assert report.unchanged == 8 and report.added == len(records(index)) - 8
    assert records(resumed) == records(clean) == records(index)
    with IndexStore.open(clean) as a, IndexStore.open(resumed) as b:
        ids = [r.id for r in a.records()]
        np.testing.assert_array_equal(a.vectors(ids), b.vectors(ids))


def test_dim_0_trains_without_a_projection(tmp_path: Path, capsys) -> None:
    from lookalike.train.model_dir import read_info

    data = write_labelled(tmp_path / "data", classes=2, per_class=8)
    args = [a if a != "32" else "0" for a in TINY_ARGS]  # --dim 0
    assert main(["-q", "train", str(data), "--out", str(tmp_path / "m"), *args]) == 0
    info = read_info(tmp_path / "m")
    assert info["projection"] is None and info["dim"] == 1280
