"""Notebook 05: score retrieval systems on labelled queries: IR metrics and significance tests (ranx), the
instruction ablation, error analysis, and the run's `metrics.json` and `report.md`.

Systems are runs ({query id: {doc id: score}}, see `embtune.search`), so dense, BM25, fused and reranked systems
are all scored the same way. Which systems a run has, and the schema of `metrics.json`, are defined here.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import DevSplit, Rule, StepConfig, TrainingData, at_least, one_of
from .encode import WEB_SEARCH_TASK, corpus_embeddings, encode, query_prompt
from .rundir import RunDir, data_fingerprint, model_fingerprint
from .search import dense_run

K_VALUES = (1, 3, 5, 10, 100)
METRICS = [f"{m}@{k}" for m in ("ndcg", "mrr", "map", "recall", "precision") for k in K_VALUES]
HEADLINE = ["ndcg@10", "mrr@10", "map@10", "recall@10", "recall@100", "precision@1"]


@dataclass(kw_only=True)
class EvalConfig(StepConfig, TrainingData, DevSplit):
    split: str | None = None  # None: "test", else "dev"
    top_k: int = 100  # documents retrieved per query (the deepest metric cut-off)
    batch_size: int = 32
    significance_test: str = "student"  # ranx: "student" (paired t-test) or "fisher" (randomisation test)
    limits: str = "warn"  # Vertex AI dataset-size limits: "error", "warn" or "off"
    labelled_file: str | None = None  # optional {"text", "label"} JSONL: classification and clustering scores
    sts_file: str | None = None  # optional STS pairs: Spearman
    bm25_stopwords: str | None = "en"  # None for languages without an English-like stop-word list
    hybrid_weights: list[float] | None = None  # dense and BM25 weights of the weighted sum; None: equal
    reranker_model: str | None = None  # a stock reranker: adds the two-stage systems
    rerank_top_k: int = 100  # dense candidates the reranker re-scores per query
    rerank_max_length: int = 1024  # tokens of instruction + query + document the reranker reads
    general_sts: str | None = "auto"  # the general-skill check: "auto" the bundled STS sample, a file, None off
    general_drop: float = 5.0  # warn when the shipped model loses more Spearman points (x100) than this

    RULES = {"split": one_of("test", "dev"), "top_k": at_least(1), "batch_size": at_least(1),
             "significance_test": one_of("student", "fisher"), "limits": one_of("error", "warn", "off"),
             "hybrid_weights": Rule(lambda v: len(v) == 2 and min(v) >= 0 < sum(v), "two weights (dense, BM25), "
                                    "not negative, not both 0"),
             "rerank_top_k": at_least(1), "rerank_max_length": at_least(16), "general_drop": at_least(0)}  # fmt: skip


def dense_systems(config: StepConfig) -> dict[str, str]:
    """The embedders this run has: `base`, and `finetuned` once notebook 03 has written `run_dir/model/` from
    this data and this base model (one trained from other inputs is not this run's, and is left out)."""
    from .models import resolve

    systems, run = {"base": config.base_model}, RunDir(config.run_dir)
    if run.model.exists():
        if run.current("model", data=data_fingerprint(config.data_dir),
                       base_model=model_fingerprint(resolve(config.base_model))):  # fmt: skip
            systems["finetuned"] = str(run.model)
        else:
            print(f"{run.model} was trained from other data or another base model: not scored (run notebook 03)")
    return systems


def rerankers(config: EvalConfig) -> dict[str, str]:
    """The rerankers to put on top of the dense systems: the stock one asked for, and notebook 06's when it was
    trained on this data (from that stock reranker, when one is named)."""
    from .models import resolve

    found, run = ({"rerank": config.reranker_model} if config.reranker_model else {}), RunDir(config.run_dir)
    if run.reranker_model.exists():
        base = {"reranker_model": model_fingerprint(resolve(config.reranker_model, "RERANKER"))} \
            if config.reranker_model else {}  # fmt: skip
        if run.current("reranker", data=data_fingerprint(config.data_dir), **base):
            found["tuned_rerank"] = str(run.reranker_model)
        else:
            print(f"{run.reranker_model} was trained from other data or another reranker: not scored (run notebook 06)")
    return found


def instruction_variants(model, instruction: str | None) -> dict[str, str | None]:
    """The with/without pair for the instruction ablation: the instruction in use (the model's own,
    else Qwen's web-search task when the model has none) against no instruction."""
    with_ = instruction or (None if model.prompts.get("query") else WEB_SEARCH_TASK)
    return {"with_instruction": with_, "without_instruction": ""}


def dense_runs(model, doc_emb, doc_ids, queries: dict[str, str], instructions: dict[str, str | None],
               top_k: int = 100, batch_size: int = 32) -> dict[str, dict]:  # fmt: skip
    """One run per named instruction against one set of document embeddings; two names for the same prompt
    share one encoding."""
    runs, by_prompt = {}, {}
    for name, instruction in instructions.items():
        prompt = query_prompt(model, instruction)
        if prompt not in by_prompt:
            by_prompt[prompt] = dense_run(model, queries, doc_emb, doc_ids, instruction, top_k, batch_size)
        runs[name] = by_prompt[prompt]
    return runs


def dense_system(model, model_path: str, data, queries: dict[str, str], config: EvalConfig) -> dict:
    """A dense system on the run's cached corpus embeddings: {"run", "ablation" (with and without the
    instruction), "query_prompt", "seconds"}."""
    start = time.perf_counter()
    doc_emb = corpus_embeddings(model, model_path, data, config.run_dir, config.doc_template, config.batch_size)
    variants = instruction_variants(model, config.instruction)
    runs = dense_runs(model, doc_emb, list(data.corpus), queries, {"main": config.instruction, **variants},
                      config.top_k, config.batch_size)  # fmt: skip
    main = runs.pop("main")
    prompt = query_prompt(model, variants["with_instruction"])
    return {"run": main, "ablation": runs, "query_prompt": prompt, "seconds": round(time.perf_counter() - start, 1)}


def side_by_side(models: dict[str, str], query: str, data, run_dir, template: str, k: int = 5) -> pd.DataFrame:
    """Each model's top k documents for one query, in columns (corpus embeddings from the run's cache)."""
    from .models import load_embedder, resolve

    columns = {}
    for name, path in models.items():
        path = resolve(path)
        model = load_embedder(path)
        doc_emb = corpus_embeddings(model, path, data, run_dir, template)
        ranked = dense_run(model, {"query": query}, doc_emb, list(data.corpus), None, k)["query"]
        columns[name] = [f"{(data.corpus[d]['title'] or d)[:40]}: {data.corpus[d]['text'][:80]}" for d in ranked]
    return pd.DataFrame(columns, index=pd.RangeIndex(1, k + 1, name=query[:60]))


def dev_split(data, config: EvalConfig) -> tuple[dict[str, str], dict]:
    """(queries, dev qrels): the dev queries notebooks 03 and 06 held out, for choosing without touching the
    evaluation split: the data's own dev split (with or without training labels), else a slice of the training
    queries; none for data with neither."""
    from .data import split_train_dev, training_labels

    labels = training_labels(data, config.run_dir, config.split_overlap)
    if labels.qrels:
        return labels.queries, split_train_dev(data, labels, config.seed, config.dev_fraction)[1]
    return (data.queries, data.relevant("dev")) if "dev" in data.qrels else ({}, {})


def two_stage(reranker, first: dict, queries: dict[str, str], docs: dict[str, str], config: EvalConfig,
              dev: tuple[dict, dict, dict] | None = None) -> dict:  # fmt: skip
    """A reranker on top of a first-stage run: the pure reranked run and, when dev queries are given as (their
    first-stage run, their texts, their qrels), the fused run with the reranker's weight chosen on them."""
    from .rerank import fuse_scores, rerank

    k, instruction = config.rerank_top_k, config.instruction
    out = {"rerank": rerank(reranker, queries, first, docs, k, instruction)}
    if dev and dev[2]:
        dev_first, dev_queries, dev_qrels = dev
        choice = fusion_weight(dev_qrels, dev_first, rerank(reranker, dev_queries, dev_first, docs, k, instruction),
                               k)  # fmt: skip
        out["fused"] = fuse_scores(first, out["rerank"], choice.chosen, k)
        dev_score = next(p["ndcg@10"] for p in choice.curve if p["weight"] == choice.chosen)
        out["fusion"] = {"weight": choice.chosen, "dev_queries": len(dev_qrels), "dev_ndcg@10": dev_score,
                         "why": choice.reason, "curve": choice.curve}  # fmt: skip
    return out


def dev_corpus(data, dev_qrels: dict, size: int, seed: int, template: str) -> dict[str, str]:
    """The documents dev queries are searched in: their positives and a seeded sample of the others, `size` in all
    (thousands of documents score in seconds; a candidate model of the moment gets no cache)."""
    docs = data.doc_texts(template)
    keep = {d for ds in dev_qrels.values() for d in ds}
    others = sorted(set(docs) - keep)
    random.Random(seed).shuffle(others)
    keep |= set(others[: max(0, size - len(keep))])
    return {d: docs[d] for d in sorted(keep)}


def dense_ndcg(model, queries: dict[str, str], qrels: dict, docs: dict[str, str], instruction: str | None = None,
               batch_size: int = 32) -> dict[str, float]:  # fmt: skip
    """Per-query NDCG@10 of a model on labelled queries, searching `docs`."""
    doc_emb = encode(model, list(docs.values()), "document", batch_size=batch_size, progress=False)
    run = dense_run(model, {q: queries[q] for q in qrels}, doc_emb, list(docs), instruction, 100, batch_size)
    return per_query(qrels, run)


def mean_se(values) -> tuple[float, float]:
    """The mean and its standard error (how far the mean over these queries may be from the mean over more)."""
    values = np.asarray(list(values), dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def _ranx(qrels: dict, run: dict, name: str = "run"):
    """ranx's Qrels and Run. ranx is imported here, not at the top: training imports this module for its dev
    corpus, and the GPU machine's kit carries no ranx (numba and llvmlite alone are most of its 60 MiB)."""
    from ranx import Qrels, Run

    return Qrels(qrels), Run({q: docs for q, docs in run.items() if docs}, name=name)


def score(qrels: dict, run: dict, metrics: list[str] = METRICS) -> dict[str, float]:
    """Mean of each metric over the labelled queries (graded relevance: score > 0 is relevant); a query the
    system retrieved nothing for scores 0."""
    if not any(run.get(q) for q in qrels):
        return dict.fromkeys(metrics, 0.0)
    from ranx import evaluate

    result = evaluate(*_ranx(qrels, run), metrics, make_comparable=True)
    if not isinstance(result, dict):  # ranx returns a bare number for one metric
        result = {metrics[0]: result}
    return {m: round(float(result[m]), 6) for m in metrics}


def per_query(qrels: dict, run: dict, metric: str = "ndcg@10") -> dict[str, float]:
    if not any(run.get(q) for q in qrels):
        return dict.fromkeys(sorted(qrels), 0.0)
    from ranx import evaluate

    values = evaluate(*_ranx(qrels, run), metric, return_mean=False, make_comparable=True)
    return dict(zip(sorted(qrels), map(float, values), strict=True)) if len(qrels) else {}


# Pooled judgements (grades 0 included) that leave a system's top 10 less judged than this do not measure it yet.
MIN_JUDGED = 0.5


def judged_coverage(judgements: dict[str, dict[str, int]], qrels: dict, runs: dict[str, dict], k: int = 10) -> dict:
    """How far partial judgements measure each system: the share of its top k that was judged (relevant or not),
    and its NDCG@10 on the judged documents only (the "condensed list" of Sakai 2007, which ranks what was judged
    and drops the rest) beside the usual score, which counts unjudged documents as not relevant. `judgements` are
    every grade of the split (0 included), `qrels` its relevant ones (the evaluated queries). When the split holds
    grade-0 judgements (pooled ones, not only positives), a system below MIN_JUDGED gets a warning."""
    pooled = any(s <= 0 for q in qrels for s in judgements.get(q, {}).values())
    out = {}
    for name, run in runs.items():
        shares, condensed = [], {}
        for q in qrels:
            ranked, seen = run.get(q, {}), judgements.get(q, {})
            top = sorted(ranked, key=ranked.get, reverse=True)[:k]
            shares.append(sum(d in seen for d in top) / k)
            condensed[q] = {d: v for d, v in ranked.items() if d in seen}
        share = round(float(np.mean(shares)), 4) if shares else 0.0
        out[name] = {f"judged@{k}": share, "ndcg@10 judged only": score(qrels, condensed, ["ndcg@10"])["ndcg@10"]}
        if pooled and share < MIN_JUDGED:
            out[name]["warning"] = (f"{name}: only {share:.0%} of its top {k} is judged, so its NDCG@10 counts most "
                                    "of what it retrieves as not relevant: judge its new documents (run notebook 00 "
                                    "again: they join the pools) before comparing it")  # fmt: skip
    return out


def significance(qrels: dict, runs: dict[str, dict], baseline: str = "base", metrics: list[str] = HEADLINE,
                 test: str = "student", max_p: float = 0.05) -> dict:  # fmt: skip
    """Paired test of each system against `baseline` over the same queries (ranx: "student" is the paired
    t-test, "fisher" the randomisation test). Returns {system: {metric: {delta, p_value, significant}}}."""
    names = [baseline] + [n for n in runs if n != baseline and any(runs[n].get(q) for q in qrels)]
    if baseline not in runs or len(names) < 2:
        return {}
    from ranx import Qrels, compare

    report = compare(Qrels(qrels), [_ranx(qrels, runs[n], n)[1] for n in names], metrics=metrics, stat_test=test,
                     max_p=max_p, make_comparable=True).to_dict()  # fmt: skip
    out = {"test": test, "baseline": baseline, "max_p": max_p}
    for name in names[1:]:
        out[name] = {
            m: {
                "delta": round(report[name]["scores"][m] - report[baseline]["scores"][m], 6),
                "p_value": float(report[baseline]["comparisons"][name][m]),
                "significant": bool(report[baseline]["comparisons"][name][m] < max_p),
            }
            for m in metrics
        }
    return out


def wins_losses(qrels: dict, runs: dict[str, dict], queries: dict[str, str], metric: str = "ndcg@10") -> pd.DataFrame:
    """Per-query `metric` of two systems (the first is the reference), sorted from the biggest loss to the biggest
    win, the columns named after the systems."""
    (ref, ref_run), (other, other_run) = runs.items()
    a, b = per_query(qrels, ref_run, metric), per_query(qrels, other_run, metric)
    table = pd.DataFrame([{"query_id": q, "query": queries[q], ref: a[q], other: b[q]} for q in a])
    table["delta"] = table[other] - table[ref]
    return table.sort_values(["delta", "query_id"]).reset_index(drop=True)


def tally(table: pd.DataFrame, tolerance: float = 1e-9) -> dict[str, int]:
    delta = table["delta"].to_numpy()
    return {
        "wins": int((delta > tolerance).sum()),
        "ties": int((np.abs(delta) <= tolerance).sum()),
        "losses": int((delta < -tolerance).sum()),
    }


def error_examples(table: pd.DataFrame, qrels: dict, run: dict, docs: dict[str, str], n: int = 5) -> list[dict]:
    """The `n` biggest losses of a wins/losses table, each with its query, its gold document and what the system
    retrieved first instead (texts cut to 160 characters)."""
    rows = []
    for row in table[table["delta"] < 0].head(n).itertuples():
        ranked = sorted(run.get(row.query_id, {}), key=run[row.query_id].get, reverse=True)
        gold = max(qrels[row.query_id], key=qrels[row.query_id].get)
        instead = next((d for d in ranked if d not in qrels[row.query_id]), None)
        rows.append({"query": row.query, "gold": docs[gold][:160], "retrieved_instead": docs[instead][:160]
                     if instead else "", "gold_rank": ranked.index(gold) + 1 if gold in ranked else None,
                     "delta": round(float(row.delta), 4)})  # fmt: skip
    return rows


def beats(values: np.ndarray, other: np.ndarray) -> float:
    """One-sided paired t-test p-value that `values` beat `other` over the same queries (the paired t-test is
    the one-sample test of the per-query gains)."""
    from scipy.stats import ttest_1samp

    gain = np.round(values - other, 9)  # float noise off: equal rankings gain exactly 0
    if np.ptp(gain) == 0:  # the same gain on every query: no variance for the t-test (scipy warns, returns nan)
        return 0.0 if gain[0] > 0 else 1.0
    return float(ttest_1samp(gain, 0.0, alternative="greater").pvalue)


@dataclass
class Choice:
    """What `choose_on_dev` chose, each candidate's dev score beside it, and which question decided."""

    chosen: object
    curve: list[dict]  # per candidate: its mean, standard error, p against the base and against the default
    question: str  # "base": (a) decided; "default" or "alternative": (b) decided
    reason: str  # one line


def choose_on_dev(per: dict, key: str, default, base=None, alpha: float = 0.05) -> Choice:
    """Choose among candidates (slerp t's, checkpoints, fusion weights) by their per-query dev NDCG@10 (`per`:
    {candidate: {query: score}}), in two questions, so that a pick is never made on noise:

    (a) does the `default` (the model as trained, at the end of training; the reranker's own order) beat the
        `base` (what the user already has) in a one-sided paired t-test at `alpha`? If not, the base ships.
    (b) an alternative replaces the default only where it beats the default in the same test, at `alpha`
        divided by the number of alternatives (Bonferroni: with three alternatives, one of them otherwise beats
        the default by chance up to three times as often); the best such alternative by mean.

    Why not the maximum: on ~100 dev queries several candidates' means sit within a standard error of each
    other, and the largest of several noisy estimates is biased upward; picking it overfits the dev set (Cawley &
    Talbot 2010, "On over-fitting in model selection and subsequent selection bias in performance evaluation",
    JMLR 11). Measured: the maximum of a slerp grid, 0.002 above the default at a standard error of 0.033, cost
    0.029 test NDCG@10 on a held-out code-search set (issue 29); docs/BENCHMARKS.md, "Decisions on
    dev", sets each choice's dev score beside its test score."""
    ids = sorted(per[default])
    scores = {c: np.array([per[c][q] for q in ids]) for c in per}
    others = [c for c in per if c not in (default, base)]
    curve = []
    for c in sorted(per):
        mean, se = mean_se(scores[c])
        curve.append({key: c, "ndcg@10": round(mean, 6), "se": round(se, 6),
                      "p_vs_base": None if base is None or c == base else beats(scores[c], scores[base]),
                      "p_vs_default": None if c == default else beats(scores[c], scores[default])})  # fmt: skip
    row = {r[key]: r for r in curve}
    n = len(ids)

    def score(c) -> str:
        return f"{key} = {c}: {row[c]['ndcg@10']:.4f} ± {row[c]['se']:.4f}"

    if base is not None and base != default and row[default]["p_vs_base"] >= alpha:
        return Choice(base, curve, "base", f"{score(default)} does not beat {score(base)} on {n} dev queries "
                      f"(one-sided paired t-test p = {row[default]['p_vs_base']:.2f}, needs < {alpha})")  # fmt: skip
    level = alpha / max(1, len(others))
    better = [c for c in others if row[c]["p_vs_default"] < level]
    if not better:
        best = max(others, key=lambda c: row[c]["ndcg@10"], default=None)
        vs = "" if best is None else (f"; the best alternative, {score(best)}, is within noise of it (p = "
                                      f"{row[best]['p_vs_default']:.2f}, needs < {level:.3g})")  # fmt: skip
        gain = "" if base is None or base == default else (f", beats {score(base)} (p = "
                                                           f"{row[default]['p_vs_base']:.1e})")  # fmt: skip
        return Choice(default, curve, "default", f"the default, {score(default)}{gain}{vs}")
    pick = max(better, key=lambda c: row[c]["ndcg@10"])
    return Choice(pick, curve, "alternative", f"{score(pick)} beats the default, {score(default)}, on {n} dev "
                  f"queries (p = {row[pick]['p_vs_default']:.1e} < {level:.3g})")  # fmt: skip


def fusion_weight(qrels: dict, first: dict, reranked: dict, top_k: int, grid=None, alpha: float = 0.05) -> Choice:
    """The weight of the reranker in the two-stage score (`rerank.fuse_scores`) chosen on `qrels` (the dev queries)
    by `choose_on_dev`: the reranker's own order (weight 1) unless it does not beat the first stage alone
    (weight 0), or a mix beats it clearly."""
    from .rerank import fuse_scores

    grid = grid or [round(w / 10, 1) for w in range(11)]
    per = {w: per_query(qrels, fuse_scores(first, reranked, w, top_k)) for w in {0.0, 1.0, *grid}}
    return choose_on_dev(per, "weight", default=1.0, base=0.0, alpha=alpha)


def general_skill(models: dict[str, object], path: str | None, max_drop: float | None = None) -> dict:
    """Spearman (x100) of each model on a general STS set: how much of the base's general skill fine-tuning kept.
    `path` "auto" is the bundled sample (data_samples/sts_general/en.tsv, STS Benchmark pairs, CC BY-SA 4.0).
    A "warning" is added when "finetuned" scores more than `max_drop` points below "base"."""
    from . import tasks

    if not path:
        return {}
    file = tasks.general_sts_file() if path == "auto" else path
    pairs = tasks.load_sts(file)
    result = {"file": str(file), **{name: round(tasks.sts(m, *pairs)["spearman"], 2) for name, m in models.items()}}
    lost = result.get("base", 0.0) - result.get("finetuned", result.get("base", 0.0))
    if max_drop is not None and lost > max_drop:
        result["warning"] = (f"the fine-tuned model lost {lost:.1f} Spearman points of general skill: consider a "
                             "lower merge_with_base in notebook 03 if it must stay general")  # fmt: skip
    return result


def metrics_record(config: EvalConfig, split: str, n_queries: int, n_docs: int, models: dict[str, str],
                   scores: dict, sig: dict, ablation: dict, wins: dict, empty: dict[str, int], seconds: dict,
                   **parts) -> dict:  # fmt: skip
    """The run's `metrics.json`: what was scored, on what, and the numbers. `parts` adds the optional sections:
    "fusion" (two-stage weights chosen on dev), "general" (general skill kept), "errors" (the biggest losses with
    their documents), "matryoshka" (notebook 04's recommendation), "tasks" (classification, clustering, STS),
    "judged" (how far the judgements measure each system), "empty_texts" (queries and documents without text)."""
    record = {
        "split": split,
        "n_queries": n_queries,
        "n_docs": n_docs,
        "data_dir": str(config.data_dir),
        "models": models,
        "instruction": config.instruction,
        "metrics": METRICS,
        "systems": scores,
        "significance": sig,
        "queries_without_results": empty,
        "instruction_ablation": ablation,
        "wins_losses": wins,
        "seconds": seconds,
    }
    return {**record, **{k: v for k, v in parts.items() if v}}


def dense_baseline(systems: dict[str, dict]) -> str:
    """The dense system the run ships: the fine-tuned one when there is one."""
    return "finetuned" if "finetuned" in systems else "base"


def systems_table(result: dict, metrics: list[str] = HEADLINE) -> pd.DataFrame:
    """The headline metrics of every system as text, with the report's marks: † significant against `base`, and
    "worse than dense: not recommended" for a system below the dense system the run ships."""
    sig, dense = result.get("significance", {}), dense_baseline(result["systems"])
    rows = {}
    for name, values in result["systems"].items():
        marks = {m: "†" if sig.get(name, {}).get(m, {}).get("significant") else "" for m in metrics}
        row = {m: f"{values[m]:.4f}{marks[m]}" for m in metrics}
        below = values["ndcg@10"] < result["systems"][dense]["ndcg@10"] and name not in ("base", "bm25")
        row["note"] = "worse than dense: not recommended" if below else ""
        rows[name] = row
    return pd.DataFrame(rows).T


def add_systems(run_dir, scores: dict, sig: dict, **parts) -> dict:
    """Add systems scored after notebook 05 (notebook 06's rerankers) and sections (`parts`: notebook 07's
    "export" checks) to `metrics.json` and write `report.md` again, so the report holds all the run made."""
    import json

    from .files import write_json, write_text

    run = RunDir(run_dir)
    result = json.loads(run.metrics.read_text(encoding="utf-8"))
    result["systems"].update(scores)
    result["significance"].update({k: v for k, v in sig.items() if k not in ("test", "baseline", "max_p")})
    for key, value in parts.items():
        result[key] = {**result.get(key, {}), **value}
    write_json(run.metrics, result)
    write_text(run.report, report_markdown(result))
    return result


def write_model_card(run_dir, result: dict, base_model: str, language: str) -> None:
    """The fine-tuned model's card (`model/README.md`, which `push_to_hub` uploads): the base model, the language,
    the base's licence and the gain measured on the held-out split, in front of sentence-transformers' card."""
    import re

    from .files import write_text

    card = RunDir(run_dir).model / "README.md"
    if "finetuned" not in result["systems"] or not card.parent.exists():
        return
    base_card = Path(base_model) / "README.md"
    found = re.search(r"^license:\s*(\S+)", base_card.read_text(encoding="utf-8"), re.M) if base_card.exists() else None
    licence = found.group(1) if found else "unknown"
    base, tuned = result["systems"]["base"]["ndcg@10"], result["systems"]["finetuned"]["ndcg@10"]
    body = re.sub(r"\A---\n.*?\n---\n", "", card.read_text(encoding="utf-8") if card.exists() else "", flags=re.S)
    front = (f"---\nbase_model: {base_model}\nlanguage: {language}\nlicense: {licence}\n"
             "library_name: sentence-transformers\ntags: [sentence-transformers, embtune, retrieval]\n---\n")
    summary = (f"# Fine-tuned with embtune\n\nBase model: `{base_model}`. Language: {language}. Licence: the base "
               f"model's ({licence}).\n\nOn the held-out `{result['split']}` split of `{result['data_dir']}` "
               f"({result['n_queries']:,} queries, {result['n_docs']:,} documents), NDCG@10 went from {base:.4f} "
               f"(base) to {tuned:.4f} (this model), {tuned - base:+.4f}.\n\nQueries need the instruction in the "
               "model's `prompts['query']` (`model.encode_query` adds it); documents none.\n\n")  # fmt: skip
    write_text(card, front + summary + body)


def plot_systems(systems: dict[str, dict[str, float]], path=None, metrics: list[str] = HEADLINE):
    """Grouped bar chart of the headline metrics, one colour per system; saved as PNG when `path` is given.
    Returns the figure (a bare Figure: the library never changes the notebook's plotting backend)."""
    from matplotlib.figure import Figure

    from .files import atomic_path

    fig = Figure(figsize=(1.6 * len(metrics) + 2, 4))
    ax = fig.subplots()
    width = 0.8 / len(systems)
    x = np.arange(len(metrics))
    for i, (name, values) in enumerate(systems.items()):
        bars = ax.bar(x + i * width - 0.4 + width / 2, [values[m] for m in metrics], width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.legend(loc="upper left", ncols=min(4, len(systems)), fontsize=8)
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def report_markdown(result: dict) -> str:
    """A readable report of `metrics.json`: what was scored; every system with significance marks and the ones
    not to deploy in red; two-stage weights; general skill; Matryoshka; the ablation; the biggest losses."""
    sig, dense = result.get("significance", {}), dense_baseline(result["systems"])
    lines = [f"# Retrieval evaluation: {result['data_dir']}", "",
             f"Split `{result['split']}`: {result['n_queries']:,} queries, {result['n_docs']:,} documents. "
             f"Instruction: {result['instruction'] or 'the model’s own query prompt'}.", ""]  # fmt: skip
    if result.get("empty_texts"):
        lines += ["**Empty texts** (left out of training; they score 0 here): " + ", ".join(
            f"{n:,} {what}" for what, n in result["empty_texts"].items()) + ".", ""]  # fmt: skip
    lines += [f"- `{name}`: {path}" for name, path in result.get("models", {}).items()]
    table = systems_table(result)
    lines += ["", "| system | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for name, row in table.iterrows():
        label = f'<span style="color:red">{name} (worse than dense: not recommended)</span>' if row["note"] else name
        lines.append(f"| {label} | " + " | ".join(row[m] for m in HEADLINE) + " |")
    if sig:
        lines += ["", f"† differs from `{sig['baseline']}` at p < {sig['max_p']} ({sig['test']} paired test). Systems "
                  f"below `{dense}`, the dense system this run ships, are marked in red."]  # fmt: skip
    empty = {name: n for name, n in result.get("queries_without_results", {}).items() if n}
    if empty:
        listed = ", ".join(f"{k} {v}" for k, v in empty.items())
        lines += ["", f"Queries a system retrieved nothing for (scored 0): {listed}."]
    for name, fusion in result.get("fusion", {}).items():
        verdict = "the reranker does not help here" if fusion["weight"] == 0 else f"weight {fusion['weight']}"
        lines += ["", f"`{name}`: the reranker's weight in the fused score, chosen on {fusion['dev_queries']} dev "
                  f"queries: {verdict} (dev NDCG@10 {fusion['dev_ndcg@10']:.4f}; {fusion['why']})."]  # fmt: skip
    general = result.get("general")
    if general:
        scored = {k: v for k, v in general.items() if k not in ("file", "warning")}
        lines += ["", "## General skill kept", "", f"Spearman x100 on `{general['file']}`: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in scored.items()) + "."]  # fmt: skip
        if general.get("warning"):
            lines += ["", f'<span style="color:red">{general["warning"]}</span>']
    mrl = result.get("matryoshka")
    if mrl:
        lines += ["", "## Matryoshka", "", f"Smallest dimension within {mrl['tolerance']:.0%} of the full NDCG@10: "
                  f"**{mrl['recommended_dim']}** ({mrl['bytes_per_vector']:,} bytes a vector in float32; "
                  f"{mrl['million_docs']} for a million documents)."]  # fmt: skip
    if result.get("judged"):
        lines += ["", "## Judged documents", "", "| system | judged@10 | NDCG@10 | NDCG@10 on judged only |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, row in result["judged"].items():
            lines.append(f"| {name} | {row['judged@10']:.0%} | {result['systems'][name]['ndcg@10']:.4f} | "
                         f"{row['ndcg@10 judged only']:.4f} |")  # fmt: skip
        lines += [f'\n<span style="color:red">{row["warning"]}</span>' for row in result["judged"].values()
                  if row.get("warning")]  # fmt: skip
    if result.get("instruction_ablation"):
        lines += ["", "## Instruction ablation (NDCG@10)", "",
                  "| system | with instruction | without | change |", "|---|---|---|---|"]  # fmt: skip
        for name, pair in result["instruction_ablation"].items():
            w, wo = pair["with_instruction"]["ndcg@10"], pair["without_instruction"]["ndcg@10"]
            change = f"{(w - wo) / wo:+.1%}" if wo else "n/a"
            lines.append(f"| {name} | {w:.4f} | {wo:.4f} | {change} |")
    for comparison, counts in result.get("wins_losses", {}).items():
        lines += ["", f"## Per-query NDCG@10: {comparison}", "",
                  f"{counts['wins']} wins, {counts['ties']} ties, {counts['losses']} losses."]  # fmt: skip
    if result.get("errors"):
        lines += ["", "### Biggest losses", "",
                  "| query | gold document (its rank) | retrieved first instead | change |", "|---|---|---|---|"]
        for e in result["errors"]:
            lines.append(f"| {_cell(e['query'][:120])} | {_cell(e['gold'])} ({e['gold_rank'] or '>100'}) | "
                         f"{_cell(e['retrieved_instead'])} | {e['delta']:+.3f} |")  # fmt: skip
    if result.get("export"):
        from .export import parity_table

        lines += ["", "## Served = trained (notebook 07)", "", "Each export against the model it came from "
                  "(`export/parity.json`; `export/SERVING.md` says how to serve it)."]  # fmt: skip
        for name, results in result["export"].items():
            lines += ["", f"**{name}**", "", parity_table(results)]
    return "\n".join(lines) + "\n"


def headline(result: dict) -> str:
    """The few lines `make run-all` ends with: NDCG@10 and Recall@100 of every system, with the report's marks."""
    table = systems_table(result, ["ndcg@10", "recall@100"])
    width = max(len(name) for name in table.index)
    lines = [f"{'system':<{width}}  ndcg@10   recall@100"]
    lines += [f"{name:<{width}}  {row['ndcg@10']:<9} {row['recall@100']:<10} {row['note']}".rstrip()
              for name, row in table.iterrows()]  # fmt: skip
    return "\n".join(lines)
