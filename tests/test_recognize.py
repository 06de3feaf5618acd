"""Recognition: soft-voting, every confidence option, GAP of predictions, the Recognizer on
a stand-in searcher, and end to end through a Searcher (with and without the verify stage)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import near_duplicate, photo

from lookalike.errors import ConfigError
from lookalike.evaluate.metrics import global_average_precision
from lookalike.index import IndexConf, IndexStore
from lookalike.indexing import index_folder
from lookalike.labels import labels_from_folder
from lookalike.local.conf import VerifyConf
from lookalike.ranking import Ranking
from lookalike.recognize import (
    CONFIDENCE,
    DEFAULT_CONFIDENCE,
    Prediction,
    Recognizer,
    confidence,
    has_labels,
    predict,
    recognize,
    soft_vote,
)
from lookalike.search import Hit, Searcher


def hits_of(*pairs: tuple[str | None, float], inliers: list[int] | None = None) -> list[Hit]:
    """Neighbours from (label, score) pairs, best first (with inlier counts if given)."""
    counts = inliers or [None] * len(pairs)
    return [
        Hit(r + 1, r, f"/gallery/{r}.jpg", s, {"label": lb} if lb else {}, n)
        for r, ((lb, s), n) in enumerate(zip(pairs, counts, strict=True))
    ]


# -- soft_vote ----------------------------------------------------------------------------


def test_soft_vote_hand_computed():
    labels = ["a", "b", "a", None, "b"]
    scores = np.array([0.9, 0.8, 0.5, 0.95, -0.2])
    # p = 2: a = 0.9^2 + 0.5^2 = 0.81 + 0.25 = 1.06; b = 0.8^2 + max(-0.2, 0)^2 = 0.64;
    # the unlabelled 0.95 votes for nothing
    votes = soft_vote(labels, scores, p=2)
    assert [lb for lb, _ in votes] == ["a", "b"]
    np.testing.assert_allclose([v for _, v in votes], [1.06, 0.64])
    # p = 1: a = 1.4, b = 0.8
    np.testing.assert_allclose([v for _, v in soft_vote(labels, scores, p=1)], [1.4, 0.8])
    # p = 8 sharpens towards the closest: a = 0.9^8 + 0.5^8 = 0.43047 + 0.00391 = 0.43437,
    # b = 0.8^8 = 0.16777
    np.testing.assert_allclose(
        [v for _, v in soft_vote(labels, scores, p=8)], [0.43437, 0.16777], atol=1e-5
    )


@pytest.mark.parametrize("p", [1.0, 3.0, 8.0])
def test_soft_vote_matches_brute_force(p):
    rng = np.random.default_rng(int(p))
    labels = [rng.choice(["x", "y", "z", None]) for _ in range(30)]
    scores = rng.uniform(-0.5, 1.0, 30)
    expected: dict[str, float] = {}
    for lb, s in zip(labels, scores, strict=True):
        if lb is not None:
            expected[lb] = expected.get(lb, 0.0) + (s if s > 0 else 0.0) ** p
    got = soft_vote(labels, scores, p)
    assert dict(got) == pytest.approx(expected)
    assert [v for _, v in got] == sorted(expected.values(), reverse=True)


def test_soft_vote_edges():
    assert soft_vote([], np.zeros(0)) == []
    assert soft_vote([None, None], np.array([0.9, 0.8])) == []
    assert soft_vote(["a"], np.array([0.5]), p=1) == [("a", 0.5)]
    # ties are broken by label; padding (-inf) and nan weigh nothing
    assert soft_vote(["b", "a"], np.array([0.5, 0.5]), p=1) == [("a", 0.5), ("b", 0.5)]
    assert soft_vote(["a", "b"], np.array([-np.inf, np.nan])) == [("a", 0.0), ("b", 0.0)]
    with pytest.raises(ValueError, match="one score per label"):
        soft_vote(["a", "b"], np.array([0.5]))
    with pytest.raises(ValueError, match="one score per label"):
        soft_vote(["a"], np.array([[0.5]]))
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="positive number"):
            soft_vote(["a"], np.array([0.5]), p=bad)


# -- confidence ---------------------------------------------------------------------------

LABELS = ["a", "b", None, "a"]
SCORES = np.array([0.9, 0.8, 0.7, 0.5])
INLIERS = np.array([30, 12, 50, 4])
# p = 2: masses 0.81, 0.64, 0.49, 0.25, total 2.19; votes a = 0.81 + 0.25 = 1.06, b = 0.64
EXPECTED = {
    "vote": 1.06**0.5,  # the p-th root of the vote: 1.02956
    "share": 1.06 / 2.19,  # 0.48402
    "margin": (1.06 - 0.64) / 2.19,  # 0.19178
    "top1": 0.9,  # closest "a"
    "distractor": 0.9 - 0.7,  # closest "a" minus closest unlabelled
    "inliers": 30.0,  # most inliers among the "a" neighbours (30, 4)
}


def test_every_option_has_a_hand_computed_case():
    assert set(CONFIDENCE) == set(EXPECTED)
    assert DEFAULT_CONFIDENCE in CONFIDENCE


@pytest.mark.parametrize("method", sorted(CONFIDENCE))
def test_confidence_hand_computed(method):
    label, conf = confidence(LABELS, SCORES, method, p=2, inliers=INLIERS)
    assert label == "a"
    assert conf == pytest.approx(EXPECTED[method])


@pytest.mark.parametrize("method", sorted(CONFIDENCE))
def test_confidence_no_labelled_neighbour(method):
    assert confidence([], np.zeros(0), method, inliers=np.zeros(0)) == (None, 0.0)
    assert confidence([None], np.array([0.9]), method, inliers=np.array([9])) == (None, 0.0)


@pytest.mark.parametrize(
    ("method", "expected"),
    # one neighbour "a" at 0.6, p = 1: vote 0.6, share 0.6 / 0.6 = 1, margin (0.6 - 0) / 0.6
    # = 1, top1 0.6, distractor 0.6 - 0 (no unlabelled neighbour), inliers 7
    [
        ("vote", 0.6),
        ("share", 1.0),
        ("margin", 1.0),
        ("top1", 0.6),
        ("distractor", 0.6),
        ("inliers", 7.0),
    ],
)
def test_confidence_single_neighbour(method, expected):
    got = confidence(["a"], np.array([0.6]), method, p=1, inliers=np.array([7]))
    assert got == ("a", pytest.approx(expected))


def test_distractor_closer_than_match_is_negative():
    # the query's closest image is unlabelled (0.95): 0.6 - 0.95 = -0.35; share with p = 1 is
    # 0.6 / (0.95 + 0.6) = 0.3871
    labels, scores = [None, "a"], np.array([0.95, 0.6])
    assert confidence(labels, scores, "distractor")[1] == pytest.approx(-0.35)
    assert confidence(labels, scores, "share", p=1)[1] == pytest.approx(0.6 / 1.55)


def test_confidence_errors():
    with pytest.raises(ConfigError, match="unknown confidence 'nope'; valid: vote, share"):
        confidence(LABELS, SCORES, "nope")
    with pytest.raises(ConfigError, match="needs verification inlier counts"):
        confidence(LABELS, SCORES, "inliers")
    with pytest.raises(ValueError, match="one count per neighbour"):
        confidence(LABELS, SCORES, "inliers", inliers=np.array([1, 2]))


# -- predictions and GAP ------------------------------------------------------------------

# Four queries (p = 1). q1 true a: neighbours a 0.9, a 0.8. q2 true b: a 0.6, unlabelled 0.6
# (wrong). q3 of nothing in the collection: unlabelled 0.9, b 0.85 (wrong whatever it says).
# q4 true b: b 0.7, c 0.3.
QUERIES = [
    hits_of(("a", 0.9), ("a", 0.8)),
    hits_of(("a", 0.6), (None, 0.6)),
    hits_of((None, 0.9), ("b", 0.85)),
    hits_of(("b", 0.7), ("c", 0.3)),
]
TRUTH = ["a", "b", None, "b"]


@pytest.mark.parametrize(
    ("method", "confidences", "gap"),
    [
        # share: q1 1.7/1.7 = 1, q2 0.6/1.2 = 0.5, q3 0.85/1.75 = 0.4857, q4 0.7/1.0 = 0.7.
        # Sorted: q1 right (P = 1/1), q4 right (P = 2/2), q2, q3 wrong;
        # GAP = (1 + 1) / 3 queries with a true label = 0.6667.
        ("share", [1.0, 0.5, 0.85 / 1.75, 0.7], 2 / 3),
        # top1: q1 0.9, q2 0.6, q3 0.85, q4 0.7. Sorted: q1 right (1/1), q3 wrong,
        # q4 right (2/3), q2 wrong; GAP = (1 + 2/3) / 3 = 0.5556.
        ("top1", [0.9, 0.6, 0.85, 0.7], 5 / 9),
    ],
)
def test_gap_of_predictions(method, confidences, gap):
    preds = [predict(q, p=1, confidence=method) for q in QUERIES]
    assert [x.label for x in preds] == ["a", "a", "b", "b"]
    assert [x.confidence for x in preds] == pytest.approx(confidences)
    got = global_average_precision([x.label for x in preds], [x.confidence for x in preds], TRUTH)
    assert got == pytest.approx(gap)


def test_predict_abstains_below_min_confidence():
    # share, p = 1: q2 has 0.5 < 0.6 and abstains, but keeps its confidence and votes
    pred = predict(QUERIES[1], p=1, confidence="share", min_confidence=0.6)
    assert pred == Prediction(None, pytest.approx(0.5), [("a", pytest.approx(0.6))], QUERIES[1])
    assert predict(QUERIES[0], p=1, confidence="share", min_confidence=0.6).label == "a"
    # abstaining from q2 and q3 changes nothing to GAP here (both were wrong, ranked last):
    preds = [predict(q, p=1, confidence="share", min_confidence=0.6) for q in QUERIES]
    assert [x.label for x in preds] == ["a", None, None, "b"]
    gap = global_average_precision([x.label for x in preds], [x.confidence for x in preds], TRUTH)
    assert gap == pytest.approx(2 / 3)


def test_predict_empty():
    assert predict([]) == Prediction(None, 0.0, [], [])


class _Stage:
    def __init__(self, name: str) -> None:
        self.name, self.depth = name, 0


class FakeSearcher:
    """Stands in for a Searcher: fixed neighbours for every query, the stages named."""

    def __init__(self, rows: list[list[Hit]], stages: tuple[str, ...] = ()) -> None:
        self.rows = rows
        self.stages = [_Stage(n) for n in stages]
        self.calls: list[tuple[list, int]] = []

    def search(self, queries, k=10, rotations=None, progress=None) -> Ranking:
        self.calls.append((list(queries), k))
        if progress is not None:
            progress(len(queries), len(queries))
        return Ranking.empty(k, batch=len(queries))

    def results(self, ranking: Ranking) -> list[list[Hit]]:
        n, k = ranking.ids.shape
        return [row[:k] for row in self.rows[:n]]


def test_recognizer_votes_with_the_verified_inliers():
    # "b" has more inliers (40) but "a" the better similarity: k = 2 neighbours vote
    rows = [hits_of(("a", 0.9), ("b", 0.8), ("b", 0.8), inliers=[3, 40, -1])]
    searcher = FakeSearcher(rows, stages=("dba+aqe", "verify"))
    rec = Recognizer(searcher, k=2, p=1, confidence="inliers")
    seen = []
    (pred,) = rec.predict(["q.jpg"], progress=lambda done, n: seen.append((done, n)))
    assert searcher.calls == [(["q.jpg"], 2)] and seen == [(1, 1)]
    # a 0.9 beats b 0.8; confidence = the most inliers among the "a" neighbours = 3
    assert (pred.label, pred.confidence, len(pred.neighbours)) == ("a", 3.0, 2)
    assert rec.predict([]) == [] and len(searcher.calls) == 1
    assert len(rec.predict(np.ones((1, 4), np.float32))) == 1  # an (n, D) array of vectors
    # unverified neighbours (inliers -1 or None) count 0
    rows = [hits_of(("a", 0.9), ("b", 0.8), inliers=[-1, 7])]
    (pred,) = Recognizer(FakeSearcher(rows, ("verify",)), k=2, p=1, confidence="inliers").predict(
        [1]
    )
    assert (pred.label, pred.confidence) == ("a", 0.0)


def test_inliers_confidence_needs_the_verify_stage():
    with pytest.raises(ConfigError, match=r"needs geometric verification.*--rerank verify"):
        Recognizer(FakeSearcher([], stages=("dba",)), confidence="inliers")
    rec = Recognizer(FakeSearcher([hits_of(("a", 0.5))]), k=1, p=1, confidence="top1")
    assert not rec.verified and rec.predict(["q"])[0].confidence == pytest.approx(0.5)


def test_prediction_to_dict():
    pred = predict(hits_of(("a", 0.9), (None, 0.5)), p=1)
    d = pred.to_dict("q.jpg")
    assert d["image"] == "q.jpg" and d["label"] == "a" and d["votes"] == [["a", 0.9]]
    assert d["confidence"] == pytest.approx(0.9)
    assert [n["rank"] for n in d["neighbours"]] == [1, 2] and "metadata" not in d["neighbours"][1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "positive integer"),
        ({"k": 2.5}, "positive integer"),
        ({"p": 0}, "positive number"),
        ({"confidence": "best"}, "unknown confidence"),
        ({"min_confidence": math.nan}, "finite"),
    ],
)
def test_recognizer_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Recognizer(FakeSearcher([]), **kwargs)


# -- end to end on generated images -------------------------------------------------------

CLASSES = {"cat": "chelsea", "cup": "coffee", "rocket": "rocket"}
DISTRACTORS = ("astronaut", "camera", "coins")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, default_extractor):
    """root/<class>/ holds a photo and two near-duplicates; root/ holds 3 unrelated photos."""
    root = tmp_path_factory.mktemp("labelled")
    for label, name in CLASSES.items():
        (root / label).mkdir()
        img = photo(name, 96)
        for k in range(3):
            (img if k == 0 else near_duplicate(img, k)).save(root / label / f"{k}.png")
    for name in DISTRACTORS:
        photo(name, 96).save(root / f"{name}.png")
    queries = tmp_path_factory.mktemp("queries")
    for name in (*CLASSES.values(), DISTRACTORS[0]):
        near_duplicate(photo(name, 96), 3).save(queries / f"{name}.png")
    index = root.parent / f"{root.name}-index"
    report = index_folder(
        root,
        index,
        default_extractor.conf,
        extractor=default_extractor,
        metadata=labels_from_folder(root),
    )
    assert report.added == 12
    return index, queries


def test_recognize_end_to_end(gallery, default_extractor):
    index, queries = gallery
    paths = [queries / f"{name}.png" for name in (*CLASSES.values(), DISTRACTORS[0])]
    with Searcher.open(index, extractor=default_extractor) as searcher:
        assert has_labels(searcher.store)
        preds = Recognizer(searcher, k=5).predict(paths)
        assert [x.label for x in preds][:3] == list(CLASSES)
        # the last query is a near-duplicate of the unlabelled astronaut
        assert preds[3].neighbours[0].metadata == {}
        neighbours = [x.neighbours for x in preds]
        for method in sorted(set(CONFIDENCE) - {"inliers"}):
            conf = [
                x.confidence
                for x in Recognizer(searcher, confidence=method).predict_hits(neighbours)
            ]
            # it may get a label, but less confidence than any true match
            assert conf[3] < min(conf[:3]), method
        # a threshold between the two abstains on the stray query only
        cut = (preds[3].confidence + min(x.confidence for x in preds[:3])) / 2
        strict = Recognizer(searcher, k=5, min_confidence=cut).predict(paths)
        assert [x.label for x in strict] == [*CLASSES, None]
        # bytes and ids are queries too: an indexed image is recognised as its own label
        root = index.with_name(index.name.removesuffix("-index"))
        cat = searcher.store.find_path(str((root / "cat" / "0.png").resolve()))
        by_bytes, by_id = Recognizer(searcher, k=5).predict([paths[0].read_bytes(), cat.id])
        assert by_bytes.label == by_id.label == "cat"
        assert by_bytes.confidence == pytest.approx(preds[0].confidence)


SIFT = VerifyConf(features="sift", max_keypoints=256, max_side=128, budget=6, ratio=0.85)


def test_recognize_with_the_verify_stage(gallery, default_extractor):
    """``recognize --rerank verify``: the neighbours are verified with SIFT (computed from
    the gallery files on first use) and the inlier counts give the confidence."""
    index, queries = gallery
    paths = [queries / f"{name}.png" for name in (*CLASSES.values(), DISTRACTORS[0])]
    with Searcher.open(index, ["verify"], SIFT, extractor=default_extractor) as searcher:
        rec = Recognizer(searcher, k=5, confidence="inliers")
        assert rec.verified
        preds = rec.predict(paths)
        assert [x.label for x in preds][:3] == list(CLASSES)
        for pred in preds:
            assert all(h.inliers is not None and h.inliers >= 0 for h in pred.neighbours)
        # near-duplicates of the cat and cup photos match many inliers (the flat rocket
        # photo none at 128 px); the stray query matches its unlabelled twin, no labelled one
        cat, cup, _, stray = preds
        assert cat.confidence >= 30 and cup.confidence >= 10 and stray.confidence == 0
        assert cat.confidence == max(h.inliers for h in cat.neighbours if h.metadata)
        assert stray.neighbours[0].metadata == {} and stray.neighbours[0].inliers >= 30
        # fused scores: similarity + a bonus for inliers (none for a candidate without)
        assert cat.neighbours[0].score > 1.0 > cat.neighbours[3].score
        cautious = Recognizer(searcher, k=5, confidence="inliers", min_confidence=5)
        assert [x.label for x in cautious.predict([paths[0], paths[3]])] == ["cat", None]
    # the module function, as the CLI calls it
    again = recognize(index, paths[:1], k=5, confidence="inliers", rerank=["verify"], verify=SIFT)
    assert (again[0].label, again[0].confidence) == (preds[0].label, preds[0].confidence)
    with pytest.raises(ConfigError, match="needs geometric verification"):
        recognize(index, paths[:1], confidence="inliers")


def test_recognize_empty_index(tmp_path, default_extractor, gallery):
    _, queries = gallery
    conf = default_extractor.conf
    IndexStore.create(
        tmp_path / "empty", conf.descriptor(), default_extractor.dim, IndexConf()
    ).close()
    with Searcher.open(tmp_path / "empty", extractor=default_extractor) as searcher:
        assert not has_labels(searcher.store)
        (pred,) = Recognizer(searcher).predict([queries / "chelsea.png"])
    assert pred == Prediction(None, 0.0, [], [])


def test_recognize_one_image_index(tmp_path, default_extractor, gallery):
    _, queries = gallery
    root = tmp_path / "one"
    (root / "cat").mkdir(parents=True)
    photo("chelsea", 96).save(root / "cat" / "0.png")
    index_folder(
        root,
        tmp_path / "index",
        default_extractor.conf,
        extractor=default_extractor,
        metadata=labels_from_folder(root),
    )
    with Searcher.open(tmp_path / "index", extractor=default_extractor) as searcher:
        cat, cup = Recognizer(searcher, confidence="share").predict(
            [queries / "chelsea.png", queries / "coffee.png"]
        )
    # the only neighbour is the labelled cat: every query gets "cat", all of the vote mass
    assert (cat.label, cat.confidence, len(cat.neighbours)) == ("cat", 1.0, 1)
    assert cup.label == "cat" and cup.neighbours[0].score < cat.neighbours[0].score
