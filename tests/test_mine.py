import dataclasses
import json

import numpy as np
import pytest

from conftest import SAMPLES, with_cache, write_beir
from embtune.data import load_beir
from embtune.encode import corpus_embeddings, encode
from embtune.mine import MineConfig, mine, save


def mine_config(run_dir, **overrides):
    return MineConfig(data_dir="unused", run_dir=str(run_dir), base_model="unused", **overrides)

DOCS = [
    ("pos", "The Eiffel Tower in Paris was completed in 1889 for the World's Fair."),
    ("copy", "The  Eiffel Tower in Paris was completed in 1889 for the World's Fair."),  # whitespace only
    ("near", "The Eiffel Tower in Paris was finished in 1889 for the World's Fair."),
    ("also", "Gustave Eiffel's company built the tower in Paris, finished in 1889."),  # q1's second positive
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
            ("q4", "Who built the tower in Paris?"),
        ]
    )
    header = "query-id\tcorpus-id\tscore\n"
    train = "q1\tpos\t1\nq1\talso\t1\nq2\teasy3\t1\nq3\teasy2\t1\n"  # q1 has two labelled positives
    folder = write_beir(tmp_path / "data", corpus, queries, {"train": header + train, "test": header + "q4\talso\t1\n"})
    return load_beir(folder, limits="off")


def test_copies_of_the_positive_and_labelled_positives_are_never_negatives(planted, minilm, minilm_path, tmp_path):
    rows, stats = mine(minilm, minilm_path, planted, mine_config(tmp_path / "run", num_negatives=8,
                                                                 relative_margin=None))  # fmt: skip
    q1 = next(r for r in rows if r["query_id"] == "q1" and r["positive_id"] == "pos")
    assert {"copy", "near"}.isdisjoint(q1["negative_ids"])  # exact and near duplicates of the positive
    assert "also" not in q1["negative_ids"]  # the query's other labelled positive
    assert "pos" not in q1["negative_ids"]
    assert stats["removed"]["duplicate"] >= 2 and stats["labelled_positives_excluded"] >= 2
    assert q1["negative_ids"][:2] == ["hard2", "hard1"] or set(q1["negative_ids"][:2]) == {"hard1", "hard2"}
    assert q1["negative_scores"] == sorted(q1["negative_scores"], reverse=True)


@pytest.fixture(scope="module")
def several_positives(tmp_path_factory, minilm_path, shared):
    """pydocs, where 30 training queries get two more labelled positives: the two documents plain
    sentence-transformers ranks highest for them among those not labelled (so, unless excluded, the first
    negatives a miner would pick). The oracle is the TSV written here, not the library."""
    import shutil

    from sentence_transformers import SentenceTransformer

    folder = shutil.copytree(SAMPLES / "pydocs", tmp_path_factory.mktemp("data") / "pydocs")
    lines = (folder / "qrels" / "train.tsv").read_text().splitlines()
    positives = {}
    for line in lines[1:]:
        q, d, _ = line.split("\t")
        positives.setdefault(q, set()).add(d)
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (folder / "queries.jsonl").read_text().splitlines()}
    corpus = [json.loads(x) for x in (folder / "corpus.jsonl").read_text().splitlines()]
    model = SentenceTransformer(minilm_path, device="cpu")

    def encode_corpus(path):
        np.save(path, model.encode([f"{d['title']} {d['text']}".strip() for d in corpus], normalize_embeddings=True))

    doc_emb = np.load(shared("pydocs-minilm-plain.npy", encode_corpus))
    chosen = sorted(positives)[:30]
    query_emb = model.encode([queries[q] for q in chosen], normalize_embeddings=True)
    for q, qe in zip(chosen, query_emb, strict=True):
        ranked = [corpus[i]["_id"] for i in np.argsort(-(doc_emb @ qe))]
        extra = [d for d in ranked if d not in positives[q]][:2]
        positives[q] |= set(extra)
        lines += [f"{q}\t{d}\t1" for d in extra]
    (folder / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder, positives, chosen


def test_no_labelled_positive_of_a_query_is_ever_its_negative(several_positives, minilm, minilm_path, pydocs_minilm,
                                                              tmp_path):  # fmt: skip
    folder, positives, chosen = several_positives
    data = load_beir(folder)
    run_dir = with_cache(pydocs_minilm, tmp_path / "run")  # the same corpus: its embeddings are reused
    config = mine_config(run_dir, candidates="both", relative_margin=None, near_duplicate=None)
    rows, stats = mine(minilm, minilm_path, data, config)
    pairs = {(q, d) for q, docs in positives.items() for d in docs}
    assert {(r["query_id"], r["positive_id"]) for r in rows} == pairs and len(rows) == stats["pairs"]
    assert all(len([r for r in rows if r["query_id"] == q]) == 3 for q in chosen)
    assert all(r["negative_ids"] and not set(r["negative_ids"]) & positives[r["query_id"]] for r in rows)
    assert stats["labelled_positives_excluded"] >= 3 * 30 * 2  # each row of those queries met both extras
    kept = sum(len(r["negative_ids"]) for r in rows)
    assert kept == stats["kept"] <= stats["passed_filters"]
    assert stats["candidates_seen"] == stats["passed_filters"] + sum(stats["removed"].values())
    folder = save(rows, stats, run_dir)
    saved = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert saved == rows and json.loads((folder / "stats.json").read_text())["kept"] == kept


def test_relative_margin_keeps_only_clearly_lower_negatives(planted, minilm, minilm_path, tmp_path):
    """With the duplicate filter off, the copies of q1's positive score above 95 % of it and the margin drops them."""
    config = mine_config(tmp_path / "run", num_negatives=8, near_duplicate=None)
    rows, stats = mine(minilm, minilm_path, planted, config)
    assert all(s < 0.95 * r["positive_score"] for r in rows for s in r["negative_scores"])
    q1 = next(r for r in rows if r["query_id"] == "q1" and r["positive_id"] == "pos")
    assert {"copy", "near"}.isdisjoint(q1["negative_ids"]) and stats["removed"]["relative_margin"] >= 2


def test_rank_window_is_respected(planted, minilm, minilm_path, tmp_path):
    config = mine_config(tmp_path / "run", range_min=2, range_max=5, num_negatives=10, relative_margin=None,
                         near_duplicate=None)  # fmt: skip
    rows, _ = mine(minilm, minilm_path, planted, config)
    docs = planted.doc_texts()
    doc_ids = list(docs)
    doc_emb = encode(minilm, list(docs.values()))
    for row in rows:
        q = encode(minilm, [row["query"]], "query")[0]
        positives = {"q1": {"pos", "also"}, "q2": {"easy3"}, "q3": {"easy2"}}[row["query_id"]]
        scores = sorted((float(doc_emb[i] @ q) for i, d in enumerate(doc_ids) if d not in positives), reverse=True)
        # ranks 3-5 among the non-positives, compared by score: "pos" and "copy" embed alike and tie
        assert row["negative_scores"] == pytest.approx(scores[2:5], abs=1e-5)


def test_same_seed_same_output(planted, minilm, minilm_path, tmp_path):
    def run(seed):
        config = mine_config(tmp_path / "run", sampling="random", num_negatives=2, seed=seed, relative_margin=None)
        return mine(minilm, minilm_path, planted, config)[0]

    first = run(7)
    assert run(7) == first
    assert any(run(seed) != first for seed in (1, 2, 3))


def test_bm25_candidates_find_lexical_matches(planted, minilm, minilm_path, tmp_path):
    config = mine_config(tmp_path / "run", candidates="bm25", num_negatives=3, relative_margin=None,
                         near_duplicate=None)  # fmt: skip
    rows, _ = mine(minilm, minilm_path, planted, config)
    q2 = next(r for r in rows if r["query_id"] == "q2")
    assert q2["negative_ids"] and "easy3" not in q2["negative_ids"]


def test_both_candidate_sources_are_merged_and_ranked_by_the_dense_score(tmp_path):
    """candidates="both": the union of the embedder's and BM25's top `depth`, each query's ranked by the
    embedder's score, so a lexical-only match joins the dense ones where its score puts it (numpy's argsort and
    the "bm25" source alone are the oracle)."""
    from embtune.mine import _ranked_candidates

    rng = np.random.default_rng(0)
    docs = [f"page {w}" for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")]
    doc_emb = rng.normal(size=(8, 4)).astype(np.float32)
    query_emb = rng.normal(size=(2, 4)).astype(np.float32)
    texts = {"a": "zeta page", "b": "theta and beta"}

    def ranked(source):
        return _ranked_candidates(mine_config(tmp_path, candidates=source), ["a", "b"], texts, query_emb, docs,
                                  doc_emb, 3)  # fmt: skip

    dense, lexical, both = ranked("dense"), ranked("bm25"), ranked("both")
    for i, q in enumerate(["a", "b"]):
        scores = doc_emb @ query_emb[i]
        assert dense[q] == list(np.argsort(-scores)[:3])
        union = set(dense[q]) | set(lexical[q])
        assert both[q] == sorted(union, key=lambda d: -scores[d]) and len(union) > 3, q
    assert docs.index("page zeta") in both["a"] and docs.index("page theta") in both["b"]


def test_reranker_vetoes_what_it_scores_above_the_threshold(planted, minilm, minilm_path, tmp_path):
    from sentence_transformers import CrossEncoder

    reranker = CrossEncoder(minilm_path, num_labels=1)  # a real cross-encoder, untrained head
    base = mine_config(tmp_path / "run", num_negatives=10, relative_margin=None, near_duplicate=None)
    rows, _ = mine(minilm, minilm_path, planted, base)
    scores = reranker.predict([(r["query"], n) for r in rows for n in r["negatives"]])
    threshold = float(np.median(scores))
    vetoed = dataclasses.replace(base, reranker_threshold=threshold)
    rows2, stats = mine(minilm, minilm_path, planted, vetoed, reranker=reranker)
    assert stats["removed"]["reranker"] == int((scores > threshold).sum()) > 0
    assert sum(len(r["negatives"]) for r in rows2) == int((scores <= threshold).sum())


def test_corpus_is_embedded_once_and_cached(planted, minilm, minilm_path, tmp_path):
    first = corpus_embeddings(minilm, minilm_path, planted, tmp_path, "{title} {text}")
    [cached] = list((tmp_path / "cache").glob("corpus-*.npy"))
    mtime = cached.stat().st_mtime_ns
    np.testing.assert_array_equal(corpus_embeddings(minilm, minilm_path, planted, tmp_path, "{title} {text}"), first)
    assert cached.stat().st_mtime_ns == mtime
    corpus_embeddings(minilm, minilm_path, planted, tmp_path, "{text}")  # another key
    assert len(list((tmp_path / "cache").glob("corpus-*.npy"))) == 2


def test_ict_pairs_get_no_mined_negatives_and_labelled_pairs_still_do(planted, minilm, minilm_path, tmp_path):
    from embtune.synthetic import SynthConfig, generate

    run_dir = tmp_path / "run"
    generate(minilm, minilm_path, planted, SynthConfig(data_dir=str(planted.path), run_dir=str(run_dir), base_model="-",
                                                       generator_model="crop", round_trip_k=None, min_chars=1))
    rows, stats = mine(minilm, minilm_path, planted, mine_config(run_dir, num_negatives=2, relative_margin=None))
    unsupervised = [r for r in rows if r["query_id"].startswith("synthetic:")]
    assert unsupervised and stats["unsupervised_pairs"] == len(unsupervised)
    assert all(r["negative_ids"] == [] for r in unsupervised)
    assert all(len(r["negative_ids"]) == 2 for r in rows if not r["query_id"].startswith("synthetic:"))
    assert stats["pairs_with_fewer_negatives"] == 0


def test_the_top_candidate_is_a_negative_when_the_positive_ranks_below_it(minilm, minilm_path, tmp_path):
    """A query whose labelled document is not the embedder's first hit (Big Ben asked about by year, the Eiffel
    Tower ranking above it): the window starts at the first non-positive, whatever rank the positive holds, and
    every negative is what an independent ranking puts there."""
    corpus = "\n".join(json.dumps({"_id": i, "text": t}) for i, t in DOCS)
    queries = json.dumps({"_id": "q5", "text": "Which famous tower was completed in the 1880s for a World's Fair?"})
    folder = write_beir(tmp_path / "data", corpus, queries, {"train": "query-id\tcorpus-id\tscore\nq5\thard2\t1\n"})
    data = load_beir(folder, limits="off")
    docs = data.doc_texts()
    doc_emb = encode(minilm, list(docs.values()))
    q = encode(minilm, [data.queries["q5"]], "query")[0]
    order = [d for _, d in sorted(((-float(doc_emb[i] @ q), d) for i, d in enumerate(docs)))]
    assert order.index("hard2") >= 2  # the fixture's point: the positive is not first
    config = mine_config(tmp_path / "run", num_negatives=3, relative_margin=None, near_duplicate=None)
    [row], _ = mine(minilm, minilm_path, data, config)
    assert row["negative_ids"] == [d for d in order if d != "hard2"][:3]


def test_negatives_are_reused_only_when_mined_from_the_same_data_and_settings(planted, minilm, minilm_path, tmp_path,
                                                                               capsys):  # fmt: skip
    """The run directory's reuse rule, for mining as for the other steps: the same settings read the saved
    negatives back; changed settings, or other data into the same run, mine again; reuse="error" stops, naming
    what changed."""
    import shutil

    from embtune.rundir import StaleArtifact

    run = tmp_path / "run"

    def mined(data, **settings):
        config = dataclasses.replace(mine_config(run, **settings), data_dir=str(data.path))
        rows, stats = mine(minilm, minilm_path, data, config)
        save(rows, stats, run)
        return rows, capsys.readouterr().out

    first, _ = mined(planted, num_negatives=2)
    again, said = mined(planted, num_negatives=2, batch_size=3, reuse="error")  # the batch shapes nothing
    assert again == first and "mined from the same inputs and settings; reused" in said
    with pytest.raises(StaleArtifact, match=r"\(changed: base_model\)"):  # another model mines other negatives
        mine(minilm, str(planted.path), planted, dataclasses.replace(mine_config(run, num_negatives=2, reuse="error"),
                                                                    data_dir=str(planted.path)))  # fmt: skip
    more, said = mined(planted, num_negatives=3)
    assert "(changed: num_negatives); rebuilding" in said and max(len(r["negative_ids"]) for r in more) == 3
    with pytest.raises(StaleArtifact, match=r"made from other inputs \(changed: range_max\)"):
        mined(planted, num_negatives=3, range_max=4, reuse="error")
    other = shutil.copytree(planted.path, tmp_path / "other")
    (other / "queries.jsonl").write_text((other / "queries.jsonl").read_text().replace("Eiffel", "Paris"))
    _, said = mined(load_beir(other, limits="off"), num_negatives=3)
    assert "(changed: data); rebuilding" in said


def test_the_absolute_ceiling_random_sampling_and_the_counts_of_each_filter(planted, minilm, minilm_path, tmp_path):
    """max_score drops what scores above it; sampling="random" draws from the whole window, still reported in
    score order; the stats add up, pair by pair, against the plain sentence-transformers scores."""
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(minilm_path, device="cpu")
    texts = planted.doc_texts()
    settings = dict(num_negatives=2, relative_margin=None, near_duplicate=None, range_max=6)
    top, stats = mine(minilm, minilm_path, planted, mine_config(tmp_path / "top", **settings))
    q1 = next(r for r in top if r["query_id"] == "q1" and r["positive_id"] == "pos")
    ceiling = (q1["negative_scores"][0] + q1["negative_scores"][1]) / 2  # between the two best negatives
    capped, capped_stats = mine(minilm, minilm_path, planted, mine_config(tmp_path / "cap", max_score=ceiling,
                                                                          **settings))  # fmt: skip
    c1 = next(r for r in capped if r["query_id"] == "q1" and r["positive_id"] == "pos")
    assert q1["negative_ids"][0] not in c1["negative_ids"] and max(c1["negative_scores"]) <= ceiling
    assert capped_stats["removed"]["max_score"] >= 1 and stats["removed"]["max_score"] == 0
    query = plain.encode(["When was the Eiffel Tower completed?"], normalize_embeddings=True)[0]
    doc = plain.encode([texts[c1["negative_ids"][0]]], normalize_embeddings=True)[0]
    assert float(query @ doc) == pytest.approx(c1["negative_scores"][0], abs=1e-4)  # the score is the cosine
    draws = {tuple(r["negative_ids"]) for seed in range(6)
             for r in mine(minilm, minilm_path, planted, mine_config(tmp_path / f"r{seed}", sampling="random",
                                                                      seed=seed, **settings))[0]
             if r["query_id"] == "q1" and r["positive_id"] == "pos"}  # fmt: skip
    assert len(draws) > 1 and any(set(d) != set(q1["negative_ids"]) for d in draws)
    assert (stats["queries"], stats["pairs"]) == (3, 4)  # q1 twice (two positives), q2, q3
    assert stats["kept"] == sum(len(r["negative_ids"]) for r in top) and stats["unsupervised_pairs"] == 0
    assert stats["pairs_with_fewer_negatives"] == sum(len(r["negative_ids"]) < 2 for r in top)
    assert stats["candidates_seen"] == stats["passed_filters"] + sum(stats["removed"].values())
    assert all(r["positive"] == texts[r["positive_id"]] and r["query"] for r in top)
