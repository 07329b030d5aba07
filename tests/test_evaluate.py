import numpy as np
import pytest

from embtune.evaluate import (
    METRICS,
    choose_on_dev,
    dense_runs,
    error_examples,
    fusion_weight,
    per_query,
    report_markdown,
    score,
    significance,
    tally,
    wins_losses,
)

QRELS = {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 1}}


def test_metrics_on_a_hand_computed_case():
    run = {"q1": {"d9": 0.9, "d2": 0.8, "d1": 0.1}, "q2": {"d3": 0.7, "d8": 0.6}}
    m = score(QRELS, run)
    assert set(m) == set(METRICS)
    # q1: first relevant at rank 2 -> RR 1/2; q2: rank 1 -> RR 1.
    assert m["mrr@10"] == pytest.approx(0.75)
    assert m["precision@1"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@3"] == pytest.approx(1.0)
    # q1 graded NDCG@3 (linear gain, log2 discount): DCG = 2/log2(3) + 1/log2(4); IDCG = 2 + 1/log2(3).
    q1 = (2 / np.log2(3) + 1 / 2) / (2 + 1 / np.log2(3))
    assert m["ndcg@3"] == pytest.approx((q1 + 1) / 2, abs=1e-6)
    assert per_query(QRELS, run, "ndcg@3") == pytest.approx({"q1": q1, "q2": 1.0}, abs=1e-6)
    # A query the system returned nothing for scores 0, not an error; a system that found nothing at all too.
    assert score(QRELS, {"q1": run["q1"]})["mrr@10"] == pytest.approx(0.25)
    assert score(QRELS, {"q1": {}, "q2": {}})["ndcg@10"] == 0.0 and per_query(QRELS, {}) == {"q1": 0.0, "q2": 0.0}


def test_significance_and_wins_losses():
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(30)}
    bad = {q: {"x": 1.0, f"d{i}": 0.5} for i, q in enumerate(qrels)}  # relevant at rank 2
    good = {q: {f"d{i}": 1.0} for i, q in enumerate(qrels)}  # relevant at rank 1
    good["q0"] = {"x": 1.0}  # one loss
    sig = significance(qrels, {"base": bad, "finetuned": good})
    assert sig["finetuned"]["ndcg@10"]["significant"] and sig["finetuned"]["ndcg@10"]["delta"] > 0
    same = significance(qrels, {"base": bad, "finetuned": bad})
    assert not same["finetuned"]["mrr@10"]["significant"]
    table = wins_losses(qrels, {"base": bad, "finetuned": good}, {q: q.upper() for q in qrels})
    assert tally(table) == {"wins": 29, "ties": 0, "losses": 1}
    assert table.iloc[0]["query_id"] == "q0" and table.iloc[0]["delta"] < 0
    assert list(table.columns) == ["query_id", "query", "base", "finetuned", "delta"]
    docs = {"x": "an unrelated page", **{f"d{i}": f"page {i}" for i in range(30)}}
    errors = error_examples(table, qrels, good, docs)
    assert errors == [{"query": "Q0", "gold": "page 0", "retrieved_instead": "an unrelated page", "gold_rank": None,
                       "delta": -0.6309}]  # fmt: skip
    result = {
        "data_dir": "d",
        "split": "test",
        "n_queries": 30,
        "n_docs": 31,
        "instruction": None,
        "systems": {"base": score(qrels, bad), "finetuned": score(qrels, good)},
        "significance": sig,
        "wins_losses": {"finetuned vs base": tally(table)},
        "errors": errors,
    }
    report = report_markdown(result)
    assert "| finetuned | 0.9667†" in report and "29 wins, 0 ties, 1 losses" in report and "Q0" in report


def test_ndcg_equals_sentence_transformers_evaluator(minilm, pydocs_minilm):
    """Our pipeline's NDCG@10 agrees with sentence-transformers' InformationRetrievalEvaluator (on the test
    queries' documents and 200 others, which the evaluator encodes itself)."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    data, _, doc_emb = pydocs_minilm
    qrels = data.relevant("test")
    queries = {q: data.queries[q] for q in qrels}
    docs = data.doc_texts()
    keep = sorted({d for ds in qrels.values() for d in ds} | set(list(docs)[:200]))
    rows = [list(docs).index(d) for d in keep]
    ours = score(qrels, dense_runs(minilm, doc_emb[rows], keep, queries, {"main": None})["main"])
    relevant = {q: set(d) for q, d in qrels.items()}
    evaluator = InformationRetrievalEvaluator(queries, {d: docs[d] for d in keep}, relevant, ndcg_at_k=[10],
                                              mrr_at_k=[10], show_progress_bar=False)  # fmt: skip
    theirs = evaluator(minilm)
    assert ours["ndcg@10"] == pytest.approx(theirs[f"{evaluator.primary_metric}"], abs=0.005)
    assert ours["ndcg@10"] > 0.3  # real semantics: far above chance on the sample


def test_choose_on_dev_keeps_a_candidate_only_when_it_beats_zero_in_a_paired_t_test():
    """The rule behind the shipped slerp t and the fusion weight: the best mean on dev wins only when a one-sided
    paired t-test says it beats candidate 0 (the base); a lead of one lucky query among 100 is noise."""
    rng = np.random.default_rng(0)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0.2, 0.8, 100))}
    lucky = {**base, "q0": base["q0"] + 0.5}  # better on average, by one query
    steady = {q: v + 0.05 for q, v in base.items()}  # a little better on every query
    t, curve = choose_on_dev({0.0: base, 0.5: lucky, 1.0: base}, "t")
    assert t == 0.0 and max(curve, key=lambda c: c["ndcg@10"])["t"] == 0.5
    assert curve[1]["p_value"] > 0.05 and curve[1]["ndcg@10"] == pytest.approx(np.mean(list(lucky.values())), abs=1e-6)
    t, curve = choose_on_dev({0.0: base, 0.5: lucky, 1.0: steady}, "t")
    assert t == 1.0 and curve[2]["p_value"] < 1e-6 and curve[0]["p_value"] == 1.0
    assert curve[2]["se"] == pytest.approx(np.std(list(steady.values()), ddof=1) / 10, abs=1e-6)


def test_fusion_weight_is_zero_for_a_random_reranker_and_high_for_a_perfect_one():
    """The two-stage weight is chosen on dev queries: a reranker that scores at random must get weight 0, so the
    fused system is the first stage (never worse than dense); one that knows the answers must get the most weight."""
    rng = np.random.default_rng(0)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(60)}
    # A decent first stage: the relevant document somewhere in the top 5 of 30.
    first = {}
    for i, q in enumerate(qrels):
        others = [f"n{i}_{j}" for j in range(29)]
        order = others[: i % 5] + [f"d{i}"] + others[i % 5 :]
        first[q] = {d: 1.0 - r / 30 for r, d in enumerate(order)}
    random_scores = {q: {d: float(rng.random()) for d in ranked} for q, ranked in first.items()}
    weight, curve = fusion_weight(qrels, first, random_scores, top_k=30)
    assert weight == 0.0 and [p["weight"] for p in curve] == [w / 10 for w in range(11)]
    assert curve[0]["ndcg@10"] == pytest.approx(score(qrels, first, ["ndcg@10"])["ndcg@10"])
    perfect = {q: {d: float(d in qrels[q]) for d in ranked} for q, ranked in first.items()}
    weight, curve = fusion_weight(qrels, first, perfect, top_k=30)
    # The least weight that puts every relevant document first (ties go to less of the reranker).
    assert 0 < weight < 1 and {p["weight"]: p["ndcg@10"] for p in curve}[weight] == 1.0
