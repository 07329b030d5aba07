"""Notebook 05: score retrieval systems on labelled queries: IR metrics and significance tests (ranx), the
instruction ablation, error analysis, and the run's `metrics.json` and `report.md`.

Systems are runs ({query id: {doc id: score}}, see `embtune.search`), so dense, BM25, fused and reranked systems
are all scored the same way. Which systems a run has, and the schema of `metrics.json`, are defined here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from ranx import Qrels, Run, compare, evaluate

from .config import StepConfig
from .encode import WEB_SEARCH_TASK, corpus_embeddings, query_prompt
from .rundir import RunDir, data_fingerprint, model_fingerprint
from .search import dense_run

K_VALUES = (1, 3, 5, 10, 100)
METRICS = [f"{m}@{k}" for m in ("ndcg", "mrr", "map", "recall", "precision") for k in K_VALUES]
HEADLINE = ["ndcg@10", "mrr@10", "map@10", "recall@10", "recall@100", "precision@1"]


@dataclass(kw_only=True)
class EvalConfig(StepConfig):
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


def _ranx(qrels: dict, run: dict, name: str = "run") -> tuple[Qrels, Run]:
    return Qrels(qrels), Run({q: docs for q, docs in run.items() if docs}, name=name)


def score(qrels: dict, run: dict, metrics: list[str] = METRICS) -> dict[str, float]:
    """Mean of each metric over the labelled queries (graded relevance: score > 0 is relevant); a query the
    system retrieved nothing for scores 0."""
    if not any(run.get(q) for q in qrels):
        return dict.fromkeys(metrics, 0.0)
    result = evaluate(*_ranx(qrels, run), metrics, make_comparable=True)
    if not isinstance(result, dict):  # ranx returns a bare number for one metric
        result = {metrics[0]: result}
    return {m: round(float(result[m]), 6) for m in metrics}


def per_query(qrels: dict, run: dict, metric: str = "ndcg@10") -> dict[str, float]:
    if not any(run.get(q) for q in qrels):
        return dict.fromkeys(sorted(qrels), 0.0)
    values = evaluate(*_ranx(qrels, run), metric, return_mean=False, make_comparable=True)
    return dict(zip(sorted(qrels), map(float, values), strict=True)) if len(qrels) else {}


def significance(qrels: dict, runs: dict[str, dict], baseline: str = "base", metrics: list[str] = HEADLINE,
                 test: str = "student", max_p: float = 0.05) -> dict:  # fmt: skip
    """Paired test of each system against `baseline` over the same queries (ranx: "student" is the paired
    t-test, "fisher" the randomisation test). Returns {system: {metric: {delta, p_value, significant}}}."""
    names = [baseline] + [n for n in runs if n != baseline and any(runs[n].get(q) for q in qrels)]
    if baseline not in runs or len(names) < 2:
        return {}
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


def wins_losses(qrels: dict, base_run: dict, other_run: dict, queries: dict[str, str],
                metric: str = "ndcg@10") -> pd.DataFrame:  # fmt: skip
    """Per-query `metric` of two systems, sorted from the biggest loss to the biggest win."""
    base, other = per_query(qrels, base_run, metric), per_query(qrels, other_run, metric)
    table = pd.DataFrame([{"query_id": q, "query": queries[q], "base": base[q], "other": other[q]} for q in base])
    table["delta"] = table["other"] - table["base"]
    return table.sort_values(["delta", "query_id"]).reset_index(drop=True)


def tally(table: pd.DataFrame, tolerance: float = 1e-9) -> dict[str, int]:
    delta = table["delta"].to_numpy()
    return {
        "wins": int((delta > tolerance).sum()),
        "ties": int((np.abs(delta) <= tolerance).sum()),
        "losses": int((delta < -tolerance).sum()),
    }


def metrics_record(config: EvalConfig, split: str, n_queries: int, n_docs: int, systems: dict[str, str],
                   scores: dict, sig: dict, ablation: dict, wins: dict, empty: dict[str, int], seconds: dict,
                   tasks: dict | None = None) -> dict:  # fmt: skip
    """The run's `metrics.json`: what was scored, on what, and the numbers."""
    record = {
        "split": split,
        "n_queries": n_queries,
        "n_docs": n_docs,
        "data_dir": str(config.data_dir),
        "models": systems,
        "instruction": config.instruction,
        "metrics": METRICS,
        "systems": scores,
        "significance": sig,
        "queries_without_results": empty,
        "instruction_ablation": ablation,
        "wins_losses": wins,
        "seconds": seconds,
    }
    if tasks:
        record["tasks"] = tasks
    return record


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
    ax.legend(loc="upper left", ncols=len(systems), fontsize=8)
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig


def report_markdown(result: dict, examples: pd.DataFrame | None = None, n_examples: int = 5) -> str:
    """A readable report of `metrics.json`: systems with significance marks, the ablation, wins/losses."""
    sig = result.get("significance", {})
    lines = [
        f"# Retrieval evaluation: {result['data_dir']}",
        "",
        f"Split `{result['split']}`: {result['n_queries']:,} queries, {result['n_docs']:,} documents.",
        "",
        "| system | " + " | ".join(HEADLINE) + " |",
        "|---|" + "---|" * len(HEADLINE),
    ]
    for name, values in result["systems"].items():
        cells = []
        for m in HEADLINE:
            mark = "†" if sig.get(name, {}).get(m, {}).get("significant") else ""
            cells.append(f"{values[m]:.4f}{mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if sig:
        lines += ["", f"† differs from `{sig['baseline']}` at p < {sig['max_p']} ({sig['test']} paired test)."]
    empty = {name: n for name, n in result.get("queries_without_results", {}).items() if n}
    if empty:
        listed = ", ".join(f"{name} {n}" for name, n in empty.items())
        lines += ["", f"Queries a system retrieved nothing for (scored 0): {listed}."]
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
    if examples is not None and len(examples):
        losses, wins = examples[examples["delta"] < 0], examples[examples["delta"] > 0]
        for title, rows in (("Biggest losses", losses.head(n_examples)), ("Biggest wins", wins.tail(n_examples)[::-1])):
            lines += ["", f"### {title}", "", "| query | base | other | delta |", "|---|---|---|---|"]
            for row in rows.itertuples():
                query = row.query.replace("|", "\\|")[:120]
                lines.append(f"| {query} | {row.base:.3f} | {row.other:.3f} | {row.delta:+.3f} |")
    return "\n".join(lines) + "\n"
