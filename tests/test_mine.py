import json

import numpy as np
import pytest

from conftest import SAMPLES, write_beir
from embtune.data import load_beir
from embtune.encode import encode
from embtune.mine import MineConfig, corpus_embeddings, mine, save, training_pairs

DOCS = [
    ("pos", "The Eiffel Tower in Paris was completed in 1889 for the World's Fair."),
    ("copy", "The  Eiffel Tower in Paris was completed in 1889 for the World's Fair."),  # whitespace only
    ("near", "The Eiffel Tower in Paris was finished in 1889 for the World's Fair."),
    ("also", "Gustave Eiffel's company built the tower in Paris, finished in 1889."),  # labelled in test
    ("hard1", "The Statue of Liberty was dedicated in 1886 in New York Harbor."),
    ("hard2", "Big Ben's clock tower in London was completed in 1859."),
    ("easy1", "Photosynthesis converts light energy into chemical energy in plants."),
    ("easy2", "The mitochondria is the powerhouse of the cell."),
    ("easy3", "Rust is a systems programming language focused on memory safety."),
    ("easy4", "A binary search halves the search interval at every step."),
]


@pytest.fixture
def planted(tmp_path):
    corpus = "\n".join(json.dumps({"_id": i, "text": t}) for i, t in DOCS)
    queries = "\n".join(
        json.dumps({"_id": q, "text": t})
        for q, t in [
            ("q1", "When was the Eiffel Tower completed?"),
            ("q2", "What language focuses on memory safety?"),
            ("q3", "What is the powerhouse of the cell?"),
        ]
    )
    header = "query-id\tcorpus-id\tscore\n"
    folder = write_beir(
        tmp_path / "data",
        corpus,
        queries,
        {"train": header + "q1\tpos\t1\nq2\teasy3\t1\nq3\teasy2\t1\n", "test": header + "q1\talso\t1\n"},
    )
    return load_beir(folder, limits="off")


def test_copies_of_the_positive_and_labelled_positives_are_never_negatives(planted, minilm, minilm_path, tmp_path):
    config = MineConfig(num_negatives=8, relative_margin=None)
    rows, stats = mine(minilm, minilm_path, planted, tmp_path / "run", config)
    q1 = next(r for r in rows if r["query_id"] == "q1")
    assert {"copy", "near"}.isdisjoint(q1["negative_ids"])  # exact and near duplicates of the positive
    assert "also" not in q1["negative_ids"]  # a positive of the same query in another split
    assert "pos" not in q1["negative_ids"]
    assert stats["removed"]["duplicate"] >= 2 and stats["labelled_positives_excluded"] >= 2
    assert q1["negative_ids"][:2] == ["hard2", "hard1"] or set(q1["negative_ids"][:2]) == {"hard1", "hard2"}
    assert q1["negative_scores"] == sorted(q1["negative_scores"], reverse=True)


def test_no_labelled_positive_is_ever_a_negative_on_real_data(minilm, minilm_path, tmp_path):
    data = load_beir(SAMPLES / "pydocs")
    rows, stats = mine(minilm, minilm_path, data, tmp_path / "run", MineConfig(candidates="both"))
    _, _, positives = training_pairs(data, tmp_path / "run")
    assert len(rows) == stats["pairs"] == 276
    assert all(not set(r["negative_ids"]) & positives[r["query_id"]] for r in rows)
    # Every kept negative passed the relative margin against its positive.
    assert all(s < 0.95 * r["positive_score"] for r in rows for s in r["negative_scores"])
    kept = sum(len(r["negative_ids"]) for r in rows)
    assert kept == stats["kept"] <= stats["passed_filters"]
    assert stats["candidates_seen"] == stats["passed_filters"] + sum(stats["removed"].values())
    folder = save(rows, stats, tmp_path / "run")
    lines = (folder / "train.jsonl").read_text().splitlines()
    assert len(lines) == 276 and set(json.loads(lines[0])) == {
        "query_id",
        "query",
        "positive_id",
        "positive",
        "negative_ids",
        "negatives",
        "positive_score",
        "negative_scores",
    }
    assert json.loads((folder / "stats.json").read_text())["kept"] == kept


def test_rank_window_is_respected(planted, minilm, minilm_path, tmp_path):
    config = MineConfig(range_min=2, range_max=5, num_negatives=10, relative_margin=None, near_duplicate=None)
    rows, _ = mine(minilm, minilm_path, planted, tmp_path / "run", config)
    docs = planted.doc_texts()
    doc_ids = list(docs)
    doc_emb = encode(minilm, list(docs.values()))
    for row in rows:
        q = encode(minilm, [row["query"]], "query")[0]
        ranked = [doc_ids[i] for i in np.argsort(-(doc_emb @ q))]
        positives = {"q1": {"pos", "also"}, "q2": {"easy3"}, "q3": {"easy2"}}[row["query_id"]]
        expected = [d for d in ranked if d not in positives][2:5]
        assert row["negative_ids"] == expected


def test_same_seed_same_output(planted, minilm, minilm_path, tmp_path):
    def run(seed):
        config = MineConfig(sampling="random", num_negatives=2, seed=seed, relative_margin=None)
        return mine(minilm, minilm_path, planted, tmp_path / "run", config)[0]

    first = run(7)
    assert run(7) == first
    assert any(run(seed) != first for seed in (1, 2, 3))


def test_bm25_candidates_find_lexical_matches(planted, minilm, minilm_path, tmp_path):
    config = MineConfig(candidates="bm25", num_negatives=3, relative_margin=None, near_duplicate=None)
    rows, _ = mine(minilm, minilm_path, planted, tmp_path / "run", config)
    q2 = next(r for r in rows if r["query_id"] == "q2")
    assert q2["negative_ids"] and "easy3" not in q2["negative_ids"]


def test_reranker_vetoes_what_it_scores_above_the_threshold(planted, minilm, minilm_path, tmp_path):
    from sentence_transformers import CrossEncoder

    reranker = CrossEncoder(minilm_path, num_labels=1)  # a real cross-encoder, untrained head
    base = MineConfig(num_negatives=10, relative_margin=None, near_duplicate=None)
    rows, _ = mine(minilm, minilm_path, planted, tmp_path / "run", base)
    scores = reranker.predict([(r["query"], n) for r in rows for n in r["negatives"]])
    threshold = float(np.median(scores))
    vetoed = MineConfig(**{**base.__dict__, "reranker_threshold": threshold})
    rows2, stats = mine(minilm, minilm_path, planted, tmp_path / "run", vetoed, reranker=reranker)
    assert stats["removed"]["reranker"] == int((scores > threshold).sum()) > 0
    assert sum(len(r["negatives"]) for r in rows2) == int((scores <= threshold).sum())


def test_corpus_is_embedded_once_and_cached(planted, minilm, minilm_path, tmp_path):
    first = corpus_embeddings(minilm, minilm_path, planted, tmp_path)
    [cached] = list((tmp_path / "cache").glob("corpus-*.npy"))
    mtime = cached.stat().st_mtime_ns
    np.testing.assert_array_equal(corpus_embeddings(minilm, minilm_path, planted, tmp_path), first)
    assert cached.stat().st_mtime_ns == mtime
    corpus_embeddings(minilm, minilm_path, planted, tmp_path, template="{text}")  # another key
    assert len(list((tmp_path / "cache").glob("corpus-*.npy"))) == 2


def test_ict_pairs_get_no_mined_negatives_and_labelled_pairs_still_do(planted, minilm, minilm_path, tmp_path):
    from embtune.synthetic import SynthConfig, generate

    run_dir = tmp_path / "run"
    generate(minilm, minilm_path, planted, run_dir, SynthConfig(generator="crop", round_trip_k=None, min_chars=1))
    rows, stats = mine(minilm, minilm_path, planted, run_dir, MineConfig(num_negatives=2, relative_margin=None))
    unsupervised = [r for r in rows if r["query_id"].startswith("synthetic:")]
    assert unsupervised and stats["unsupervised_pairs"] == len(unsupervised)
    assert all(r["negative_ids"] == [] for r in unsupervised)
    assert all(len(r["negative_ids"]) == 2 for r in rows if not r["query_id"].startswith("synthetic:"))
    assert stats["pairs_with_fewer_negatives"] == 0
