"""Score retrieval systems on labelled queries: IR metrics and significance tests (ranx), error analysis, report.

A "run" is {query id: {doc id: score}} for the top-k documents of each query, the shape ranx and
TREC tools use, so any system (dense, BM25, fused, reranked) is scored the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from ranx import Qrels, Run, compare, evaluate
from sentence_transformers.util import semantic_search

from .encode import WEB_SEARCH_TASK, encode, query_prompt
from .files import atomic_path

K_VALUES = (1, 3, 5, 10, 100)
METRICS = [f"{m}@{k}" for m in ("ndcg", "mrr", "map", "recall", "precision") for k in K_VALUES]
HEADLINE = ["ndcg@10", "mrr@10", "map@10", "recall@10", "recall@100", "precision@1"]


def dense_search(query_emb, doc_emb, query_ids, doc_ids, top_k: int = 100) -> dict[str, dict[str, float]]:
    """Exact top-k by dot product of unit vectors (= cosine), chunked by sentence-transformers."""
    hits = semantic_search(
        torch.as_tensor(query_emb),
        torch.as_tensor(doc_emb),
        top_k=min(top_k, len(doc_ids)),
        score_function=lambda a, b: a @ b.T,
    )
    return {
        qid: {doc_ids[h["corpus_id"]]: float(h["score"]) for h in row} for qid, row in zip(query_ids, hits, strict=True)
    }


def instruction_variants(model, instruction: str | None) -> dict[str, str | None]:
    """The with/without pair for the instruction ablation: the instruction in use (the model's own,
    else Qwen's web-search task when the model has none) against no instruction."""
    with_ = instruction or (None if model.prompts.get("query") else WEB_SEARCH_TASK)
    return {"with_instruction": with_, "without_instruction": ""}


def dense_runs(
    model,
    doc_emb,
    doc_ids,
    queries: dict[str, str],
    instructions: dict[str, str | None],
    top_k: int = 100,
    batch_size: int = 32,
) -> dict[str, dict]:
    """One run per named instruction against one set of document embeddings (see `mine.corpus_embeddings`,
    which caches them per model and data, so the corpus is embedded once per run directory)."""
    query_ids = list(queries)
    runs, by_prompt = {}, {}
    for name, instruction in instructions.items():
        prompt = query_prompt(model, instruction)
        if prompt not in by_prompt:  # two names for the same prompt share one encoding
            query_emb = encode(model, [queries[q] for q in query_ids], "query", instruction, batch_size=batch_size)
            by_prompt[prompt] = dense_search(query_emb, doc_emb, query_ids, doc_ids, top_k)
        runs[name] = by_prompt[prompt]
    return runs


def bm25_run(queries: dict[str, str], docs: dict[str, str], top_k: int = 100, stopwords: str | None = "en") -> dict:
    """A BM25 run (bm25s): {query id: {doc id: score}}."""
    from .mine import bm25_candidates

    doc_ids = list(docs)
    scores, indices = bm25_candidates(list(queries.values()), list(docs.values()), top_k, stopwords)
    return {
        q: {doc_ids[i]: float(s) for i, s in zip(row, srow, strict=True) if s > 0}
        for q, row, srow in zip(queries, indices, scores, strict=True)
    }


def fuse_runs(runs: list[dict], method: str = "rrf", weights: list[float] | None = None, k: int = 60) -> dict:
    """Hybrid retrieval by ranx's fusion: reciprocal rank fusion (`rrf`, constant `k`) or a weighted sum of
    min-max normalised scores (`wsum`, `weights` default equal)."""
    from ranx import fuse

    ranx_runs = [Run({q: d for q, d in run.items() if d}, name=f"run{i}") for i, run in enumerate(runs)]
    if method == "rrf":
        fused = fuse(ranx_runs, norm=None, method="rrf", params={"k": k})
    elif method == "wsum":
        weights = weights or [1 / len(runs)] * len(runs)
        fused = fuse(ranx_runs, norm="min-max", method="wsum", params={"weights": weights})
    else:
        raise ValueError(f'method must be "rrf" or "wsum", not {method!r}')
    return {q: dict(docs) for q, docs in fused.to_dict().items()}


def _ranx(qrels: dict, run: dict, name: str = "run") -> tuple[Qrels, Run]:
    return Qrels(qrels), Run({q: docs for q, docs in run.items() if docs}, name=name)


def score(qrels: dict, run: dict, metrics: list[str] = METRICS) -> dict[str, float]:
    """Mean of each metric over the labelled queries (graded relevance: score > 0 is relevant)."""
    result = evaluate(*_ranx(qrels, run), metrics, make_comparable=True)
    if not isinstance(result, dict):  # ranx returns a bare number for one metric
        result = {metrics[0]: result}
    return {m: round(float(result[m]), 6) for m in metrics}


def per_query(qrels: dict, run: dict, metric: str = "ndcg@10") -> dict[str, float]:
    values = evaluate(*_ranx(qrels, run), metric, return_mean=False, make_comparable=True)
    return dict(zip(sorted(qrels), map(float, values), strict=True)) if len(qrels) else {}


def significance(
    qrels: dict,
    runs: dict[str, dict],
    baseline: str = "base",
    metrics: list[str] = HEADLINE,
    test: str = "student",
    max_p: float = 0.05,
) -> dict:
    """Paired test of each system against `baseline` over the same queries (ranx: "student" is the paired
    t-test, "fisher" the randomisation test). Returns {system: {metric: {delta, p_value, significant}}}."""
    if baseline not in runs or len(runs) < 2:
        return {}
    names = [baseline] + [n for n in runs if n != baseline]
    report = compare(
        Qrels(qrels),
        [_ranx(qrels, runs[n], n)[1] for n in names],
        metrics=metrics,
        stat_test=test,
        max_p=max_p,
        make_comparable=True,
    ).to_dict()
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


def wins_losses(
    qrels: dict, base_run: dict, other_run: dict, queries: dict[str, str], metric: str = "ndcg@10"
) -> pd.DataFrame:
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


def plot_systems(systems: dict[str, dict[str, float]], path, metrics: list[str] = HEADLINE):
    """Grouped bar chart of the headline metrics, one colour per system; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) + 2, 4))
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
    if result.get("instruction_ablation"):
        lines += [
            "",
            "## Instruction ablation (NDCG@10)",
            "",
            "| system | with instruction | without | change |",
            "|---|---|---|---|",
        ]
        for name, pair in result["instruction_ablation"].items():
            w, wo = pair["with_instruction"]["ndcg@10"], pair["without_instruction"]["ndcg@10"]
            change = f"{(w - wo) / wo:+.1%}" if wo else "n/a"
            lines.append(f"| {name} | {w:.4f} | {wo:.4f} | {change} |")
    for comparison, counts in result.get("wins_losses", {}).items():
        lines += [
            "",
            f"## Per-query NDCG@10: {comparison}",
            "",
            f"{counts['wins']} wins, {counts['ties']} ties, {counts['losses']} losses.",
        ]
    if examples is not None and len(examples):
        losses, wins = examples[examples["delta"] < 0], examples[examples["delta"] > 0]
        for title, rows in (("Biggest losses", losses.head(n_examples)), ("Biggest wins", wins.tail(n_examples)[::-1])):
            lines += ["", f"### {title}", "", "| query | base | other | delta |", "|---|---|---|---|"]
            for row in rows.itertuples():
                query = row.query.replace("|", "\\|")[:120]
                lines.append(f"| {query} | {row.base:.3f} | {row.other:.3f} | {row.delta:+.3f} |")
    return "\n".join(lines) + "\n"
