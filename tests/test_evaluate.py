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


def planted(base: dict, mean: float, sd: float = 0.1) -> dict:
    """`base` plus per-query gains of exactly this mean and standard deviation over 100 queries, so the one-sided
    paired t-test against `base` has t = mean / (sd / 10), a p-value computed by hand: t = 0.2 -> p 0.42, t = 1.9
    -> p 0.030, t = 4 -> p 3e-5 (Student's t, 99 degrees of freedom)."""
    z = np.tile([1.0, -1.0], 50)  # mean 0; standard deviation (ddof=1) sqrt(100/99)
    z = z / z.std(ddof=1)
    return {q: v + mean + sd * z[i] for i, (q, v) in enumerate(sorted(base.items()))}


@pytest.fixture
def base_scores():
    rng = np.random.default_rng(0)
    return {f"q{i:03d}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.7, 100))}


def test_the_trained_model_ships_when_the_grid_s_maximum_is_within_noise_of_it(base_scores):
    """(a) trained (t = 1) beats the base clearly; (b) t = 0.25 has the highest mean, 0.002 above t = 1 at a
    standard error of 0.01: noise, so t = 1 ships (the old rule, the maximum, shipped t = 0.25)."""
    from scipy.stats import t as student

    trained = planted(base_scores, 0.04)
    grid = {0.0: base_scores, 0.25: planted(trained, 0.002), 0.5: planted(trained, -0.01), 1.0: trained}
    choice = choose_on_dev(grid, "t", default=1.0, base=0.0)
    row = {r["t"]: r for r in choice.curve}
    assert max(row, key=lambda t: row[t]["ndcg@10"]) == 0.25  # the maximum, which does not ship
    assert choice.chosen == 1.0 and choice.question == "default", choice.reason
    assert row[0.25]["p_vs_default"] == pytest.approx(student.sf(0.2, 99), abs=1e-6)  # 0.42, by hand
    assert row[1.0]["p_vs_base"] == pytest.approx(student.sf(4.0, 99), rel=1e-3) and row[1.0]["p_vs_default"] is None
    assert row[0.25]["se"] == pytest.approx(np.std(list(grid[0.25].values()), ddof=1) / 10, abs=1e-6)
    assert "within noise" in choice.reason and "t = 0.25" in choice.reason


def test_an_alternative_that_beats_the_trained_model_clearly_ships(base_scores):
    """t = 0.75 beats t = 1 with t-statistic 4 (p 3e-5 < 0.05 / 2 alternatives); t = 0.25 with 1.9 (p 0.030:
    under 0.05, over the Bonferroni level) also beats it but not clearly enough on its own."""
    trained = planted(base_scores, 0.04)
    grid = {0.0: base_scores, 0.25: planted(trained, 0.019), 0.75: planted(trained, 0.04), 1.0: trained}
    choice = choose_on_dev(grid, "t", default=1.0, base=0.0)
    assert choice.chosen == 0.75 and choice.question == "alternative", choice.reason
    alone = choose_on_dev({t: grid[t] for t in (0.0, 0.25, 1.0)}, "t", default=1.0, base=0.0)
    assert alone.chosen == 0.25  # one alternative: 0.030 < 0.05 suffices
    two = {0.0: base_scores, 0.25: grid[0.25], 0.5: planted(trained, -0.01), 1.0: trained}
    assert choose_on_dev(two, "t", default=1.0, base=0.0).chosen == 1.0  # two: 0.030 > 0.025, the default stays


def test_among_clear_alternatives_the_best_ships_wherever_it_sits_in_the_grid(base_scores):
    """Two alternatives beat t = 1 clearly (t-statistics 6 and 4); the best is the first of the grid, not the
    last, and in either order of the dict it is the one that ships."""
    trained = planted(base_scores, 0.04)
    best, good = planted(trained, 0.06), planted(trained, 0.04)
    for grid in ({0.0: base_scores, 0.25: best, 0.75: good, 1.0: trained},
                 {1.0: trained, 0.75: good, 0.25: best, 0.0: base_scores}):  # fmt: skip
        choice = choose_on_dev(grid, "t", default=1.0, base=0.0)
        assert choice.chosen == 0.25 and choice.question == "alternative", choice.reason


def test_the_base_ships_when_the_trained_model_does_not_beat_it(base_scores):
    """(a) decides first: trained is 0.002 above the base (p 0.42), so the base ships, even though t = 0.25
    is a clear gain over t = 1."""
    trained = planted(base_scores, 0.002)
    grid = {0.0: base_scores, 0.25: planted(trained, 0.05), 0.75: trained, 1.0: trained}
    choice = choose_on_dev(grid, "t", default=1.0, base=0.0)
    assert choice.chosen == 0.0 and choice.question == "base", choice.reason
    assert "does not beat" in choice.reason and "p = 0.42" in choice.reason


def test_a_checkpoint_choice_has_no_base_question(base_scores):
    """Checkpoints: the end is the default and there is no base among them; the best dev step ships when clearly
    better (t-statistic 4), not when within noise (0.2)."""
    assert choose_on_dev({"end": base_scores, "step 6": planted(base_scores, 0.002)}, "checkpoint",
                         default="end").chosen == "end"  # fmt: skip
    assert choose_on_dev({"end": base_scores, "step 6": planted(base_scores, 0.04)}, "checkpoint",
                         default="end").chosen == "step 6"  # fmt: skip


def test_fusion_weight_is_zero_for_a_random_reranker_and_one_for_a_perfect_one():
    """The two-stage weight is chosen on dev queries: a reranker that scores at random must get weight 0, so the
    fused system is the first stage (never worse than dense); one that knows the answers ships as it ranks."""
    rng = np.random.default_rng(0)
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(60)}
    # A decent first stage: the relevant document somewhere in the top 5 of 30.
    first = {}
    for i, q in enumerate(qrels):
        others = [f"n{i}_{j}" for j in range(29)]
        order = others[: i % 5] + [f"d{i}"] + others[i % 5 :]
        first[q] = {d: 1.0 - r / 30 for r, d in enumerate(order)}
    random_scores = {q: {d: float(rng.random()) for d in ranked} for q, ranked in first.items()}
    choice = fusion_weight(qrels, first, random_scores, top_k=30)
    assert choice.chosen == 0.0 and choice.question == "base"
    assert [p["weight"] for p in choice.curve] == [w / 10 for w in range(11)]
    assert choice.curve[0]["ndcg@10"] == pytest.approx(score(qrels, first, ["ndcg@10"])["ndcg@10"])
    perfect = {q: {d: float(d in qrels[q]) for d in ranked} for q, ranked in first.items()}
    choice = fusion_weight(qrels, first, perfect, top_k=30)
    # The reranker's own order: no mix can beat a perfect one, though several tie with it at NDCG@10 1.0.
    assert choice.chosen == 1.0 and choice.question == "default"
    assert sum(p["ndcg@10"] == 1.0 for p in choice.curve) > 1


def test_judged_dev_queries_choose_with_or_without_training_labels(tmp_path):
    """The data's own dev split is what the rerankers' fusion weight is chosen on, also when there are no training
    labels (judged queries only); data with neither has no dev queries."""
    from conftest import write_beir
    from embtune.data import load_beir
    from embtune.evaluate import EvalConfig, dev_split

    header = "query-id\tcorpus-id\tscore\n"
    splits = {"test": header + "q0\td0\t1\nq1\td1\t1\n", "dev": header + "q2\td2\t1\nq3\td3\t2\nq3\td4\t0\n"}
    folder = write_beir(tmp_path / "judged", qrels=splits)
    config = EvalConfig(data_dir=str(folder), run_dir=str(tmp_path / "run"), base_model="-")
    queries, dev = dev_split(load_beir(folder, limits="off"), config)
    assert dev == {"q2": {"d2": 1}, "q3": {"d3": 2}} and queries["q3"] == "query 3"
    labelled = write_beir(tmp_path / "labelled", qrels={**splits, "train": header + "q5\td5\t1\n"})
    assert dev_split(load_beir(labelled, limits="off"), config)[1] == dev
    neither = write_beir(tmp_path / "neither", qrels={"test": splits["test"]})
    assert dev_split(load_beir(neither, limits="off"), config) == ({}, {})


def test_significance_is_a_paired_t_test_and_counts_ties():
    """Against scipy's paired t-test on the per-query scores (the independent reference); a gain at p between 0.05
    and 0.1 is not significant at the default level; a query with the same score is a tie."""
    from scipy.stats import ttest_rel

    from embtune.evaluate import beats, dense_baseline, mean_se

    qrels = {f"q{i}": {f"d{i}": 1} for i in range(12)}
    base = {q: {"x": 1.0, "y": 0.9, f"d{i}": 0.5} for i, q in enumerate(qrels)}  # relevant at rank 3
    tuned = {q: ({f"d{i}": 1.0} if i in (0, 1, 2) else {"x": 1.0, f"d{i}": 0.5} if i == 3 else base[q])
             for i, q in enumerate(qrels)}  # fmt: skip
    tuned["q11"] = {"x": 1.0, "y": 0.9, "z": 0.8, "d11": 0.1}  # one loss: rank 4
    sig = significance(qrels, {"base": base, "finetuned": tuned})["finetuned"]["ndcg@10"]
    a, b = per_query(qrels, tuned), per_query(qrels, base)
    reference = ttest_rel([a[q] for q in qrels], [b[q] for q in qrels])
    assert 0.05 < reference.pvalue < 0.2
    assert sig["p_value"] == pytest.approx(reference.pvalue, rel=1e-6) and not sig["significant"]
    assert sig["delta"] == pytest.approx(np.mean([a[q] - b[q] for q in qrels]), abs=1e-6) and sig["delta"] > 0
    table = wins_losses(qrels, {"base": base, "finetuned": tuned}, {q: q for q in qrels})
    assert tally(table) == {"wins": 4, "ties": 7, "losses": 1}
    # a gain without variance has no t statistic: p = 0 for a gain on every query, 1 for none
    assert beats(np.array([0.6, 0.7]), np.array([0.5, 0.6])) == 0.0
    assert beats(np.array([0.5, 0.6]), np.array([0.5, 0.6])) == 1.0
    assert beats(np.array([0.4, 0.5]), np.array([0.5, 0.6])) == 1.0
    assert mean_se([0.5]) == (0.5, 0.0) and mean_se([0.0, 1.0]) == (0.5, 0.5)
    # the biggest loss, q11: its gold document retrieved at rank 4, x first instead
    docs = {d: d.upper() for d in ("x", "y", "z", *(f"d{i}" for i in range(12)))}
    [loss] = error_examples(table, qrels, tuned, docs, n=1)
    assert loss == {"query": "q11", "gold": "D11", "retrieved_instead": "X", "gold_rank": 4,
                    "delta": round(a["q11"] - b["q11"], 4)}  # fmt: skip
    assert dense_baseline({"base": 1, "finetuned": 2}) == "finetuned" and dense_baseline({"base": 1}) == "base"


def test_the_report_reads_line_by_line_as_specified():
    """Every section of report.md from a hand-made metrics.json, against the text a reader should see."""
    systems = {"base": {m: 0.5 for m in METRICS}, "finetuned": {m: 0.6 for m in METRICS},
               "bm25": {m: 0.4 for m in METRICS}, "hybrid": {m: 0.55 for m in METRICS}}  # fmt: skip
    sig = {"baseline": "base", "max_p": 0.05, "test": "student",
           "finetuned": {"ndcg@10": {"significant": True}, "recall@100": {"significant": False}}}  # fmt: skip
    result = {
        "data_dir": "data/x", "split": "test", "n_queries": 1234, "n_docs": 56789, "instruction": None,
        "models": {"base": "m/base", "finetuned": "run/model"}, "systems": systems, "significance": sig,
        "queries_without_results": {"bm25": 3, "base": 0},
        "fusion": {"finetuned+rerank fused": {"weight": 0.0, "dev_queries": 70, "dev_ndcg@10": 0.61234,
                                              "why": "no gain"},
                   "finetuned+tuned fused": {"weight": 0.7, "dev_queries": 70, "dev_ndcg@10": 0.7,
                                             "why": "beats"}},
        "general": {"file": "sts.tsv", "base": 80.123, "finetuned": 70.0, "warning": "lost 10 points"},
        "matryoshka": {"tolerance": 0.02, "recommended_dim": 256, "bytes_per_vector": 1024, "million_docs": "1 GB"},
        "instruction_ablation": {"finetuned": {"with_instruction": {"ndcg@10": 0.6},
                                               "without_instruction": {"ndcg@10": 0.5}},
                                 "base": {"with_instruction": {"ndcg@10": 0.1}, "without_instruction": {"ndcg@10": 0}}},
        "wins_losses": {"finetuned vs base": {"wins": 5, "ties": 2, "losses": 1}},
        "errors": [{"query": "a | b\nc", "gold": "gold doc", "gold_rank": None, "retrieved_instead": "other",
                    "delta": -0.5}],
    }  # fmt: skip

    def row(name, value, first=""):
        return f"| {name} | {value:.4f}{first} | " + " | ".join([f"{value:.4f}"] * 5) + " |"

    expected = [
        "# Retrieval evaluation: data/x", "",
        "Split `test`: 1,234 queries, 56,789 documents. Instruction: the model’s own query prompt.", "",
        "- `base`: m/base", "- `finetuned`: run/model", "",
        "| system | ndcg@10 | mrr@10 | map@10 | recall@10 | recall@100 | precision@1 |",
        "|---|---|---|---|---|---|---|",
        row("base", 0.5), row("finetuned", 0.6, "†"), row("bm25", 0.4),
        row('<span style="color:red">hybrid (worse than dense: not recommended)</span>', 0.55), "",
        "† differs from `base` at p < 0.05 (student paired test). Systems below `finetuned`, the dense system this "
        "run ships, are marked in red.", "",
        "Queries a system retrieved nothing for (scored 0): bm25 3.", "",
        "`finetuned+rerank fused`: the reranker's weight in the fused score, chosen on 70 dev queries: the reranker "
        "does not help here (dev NDCG@10 0.6123; no gain).", "",
        "`finetuned+tuned fused`: the reranker's weight in the fused score, chosen on 70 dev queries: weight 0.7 (dev "
        "NDCG@10 0.7000; beats).", "",
        "## General skill kept", "", "Spearman x100 on `sts.tsv`: base 80.12, finetuned 70.00.", "",
        '<span style="color:red">lost 10 points</span>', "",
        "## Matryoshka", "", "Smallest dimension within 2% of the full NDCG@10: **256** (1,024 bytes a vector in "
        "float32; 1 GB for a million documents).", "",
        "## Instruction ablation (NDCG@10)", "", "| system | with instruction | without | change |",
        "|---|---|---|---|", "| finetuned | 0.6000 | 0.5000 | +20.0% |", "| base | 0.1000 | 0.0000 | n/a |", "",
        "## Per-query NDCG@10: finetuned vs base", "", "5 wins, 2 ties, 1 losses.", "",
        "### Biggest losses", "", "| query | gold document (its rank) | retrieved first instead | change |",
        "|---|---|---|---|", "| a \\| b c | gold doc (>100) | other | -0.500 |",
    ]  # fmt: skip
    assert report_markdown(result).split("\n") == [*expected, ""]


def test_judged_coverage_and_condensed_lists_by_hand():
    """q1's grades: d1 relevant, d2 judged not relevant; q2's: d3 relevant, d4 not. System A ranks judged documents
    only; system B puts two unjudged documents first: unjudged = not relevant sinks it, the condensed list (its
    judged documents in its order) does not. With grade-0 judgements (pooled), B's 20 % judged gets a warning;
    with positives only (sparse, BEIR-style), nobody does."""
    from embtune.evaluate import judged_coverage

    judgements = {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 1, "d4": 0}}
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1}}
    runs = {"A": {"q1": {"d1": 0.9, "d2": 0.8}, "q2": {"d4": 0.9, "d3": 0.8}},
            "B": {"q1": {"x": 0.9, "y": 0.8, "d1": 0.7}, "q2": {"x": 0.9, "d3": 0.8, "z": 0.1}}}  # fmt: skip
    got = judged_coverage(judgements, qrels, runs)
    assert got["A"]["judged@10"] == 0.2 and got["B"]["judged@10"] == 0.1  # 2 of 10 per query; 1 of 10
    assert got["A"]["ndcg@10 judged only"] == pytest.approx((1 + 1 / np.log2(3)) / 2, abs=1e-6)
    assert got["B"]["ndcg@10 judged only"] == 1.0  # d1 and d3 first once x, y, z are dropped
    assert score(qrels, runs["B"], ["ndcg@10"])["ndcg@10"] == pytest.approx((0.5 + 1 / np.log2(3)) / 2, abs=1e-6)
    assert got["B"]["warning"].startswith("B: only 10% of its top 10 is judged") and "warning" in got["A"]
    # the top 2 by score: B's q1 {x, y} none judged, q2 {x, d3} one: 25 %
    assert judged_coverage(judgements, qrels, runs, k=2)["B"]["judged@2"] == 0.25
    sparse = judged_coverage(qrels, qrels, runs)
    assert not any("warning" in row for row in sparse.values()) and sparse["B"]["judged@10"] == 0.1
    report = report_markdown({"data_dir": "d", "split": "test", "n_queries": 2, "n_docs": 9, "instruction": None,
                              "systems": {"base": score(qrels, runs["A"]), "finetuned": score(qrels, runs["B"])},
                              "judged": {"base": got["A"], "finetuned": got["B"]},
                              "empty_texts": {"queries": 1, "documents": 3}})  # fmt: skip
    assert "| finetuned | 10% | 0.5655 | 1.0000 |" in report and '<span style="color:red">B: only 10%' in report
    assert "**Empty texts** (left out of training; they score 0 here): 1 queries, 3 documents." in report
