"""Notebook 04: retrieval quality against embedding dimension (Matryoshka truncation) and precision, and what
the vectors cost to store.

Truncation is `encode.truncate` (slice, then re-normalise) on one full-size encoding. Precision goes through
sentence-transformers' `quantize_embeddings` and `semantic_search_faiss` (8-bit scalar and binary, optionally
with the float query rescoring the top candidates); float16 is a cast. The storage arithmetic is ours: no
library prints the bill.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import StepConfig, at_least, each, one_of
from .encode import truncate
from .evaluate import score
from .search import dense_search

DEFAULT_DIMS = [None, 1024, 768, 512, 384, 256, 128, 64, 32]  # None: the model's full size
MRL_METRICS = ["ndcg@10", "recall@100"]
BYTES_PER_VALUE = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "binary": 1 / 8}
HNSW_M = 32  # neighbours per node; FAISS keeps 2*M int32 ids per vector on the bottom layer


@dataclass(kw_only=True)
class MrlConfig(StepConfig):
    split: str | None = None  # None: "test", else "dev"
    dims: list[int | None] | None = None  # None: full, 1024, 768, 512, 384, 256, 128, 64, 32 (up to the model's size)
    tolerance: float = 0.01  # recommend the smallest dimension within 1 % (relative) of the full one's NDCG@10
    doc_counts: list[int] | None = None  # None: this corpus's size, 1,000,000 and 100,000,000
    rescore_multiplier: int = 4  # int8/binary + rescore: fetch 4 x 100 candidates, re-rank with the float query
    batch_size: int = 32

    RULES = {"split": one_of("test", "dev"), "dims": each(at_least(1)), "tolerance": at_least(0),
             "doc_counts": each(at_least(1)), "rescore_multiplier": at_least(1), "batch_size": at_least(1)}


def dims_for(full: int, dims: list[int | None] | None = None) -> list[int]:
    """The requested dimensions (None = full), capped at the model's size, largest first, no repeats."""
    wanted = DEFAULT_DIMS if dims is None else dims
    return sorted({full if d is None else d for d in wanted if d is None or 0 < d <= full}, reverse=True)


def quality_by_dim(query_emb, doc_emb, query_ids, doc_ids, qrels, dims: list[int]) -> dict[str, dict[str, float]]:
    """{dim: {ndcg@10, recall@100}} from full-size unit embeddings, each truncated and re-normalised."""
    out = {}
    for dim in dims:
        run = dense_search(truncate(query_emb, dim), truncate(doc_emb, dim), query_ids, doc_ids, 100)
        out[str(dim)] = score(qrels, run, MRL_METRICS)
    return out


def recommended_dim(curve: dict[str, dict[str, float]], tolerance: float = 0.01, metric: str = "ndcg@10") -> int:
    """The smallest dimension whose `metric` is within `tolerance` (relative) of the largest dimension's."""
    full = curve[max(curve, key=int)][metric]
    return min(int(d) for d, m in curve.items() if m[metric] >= full * (1 - tolerance))


def quality_by_precision(
    query_emb, doc_emb, query_ids, doc_ids, qrels, rescore_multiplier: int = 4
) -> dict[str, dict[str, float]]:
    """{precision: {ndcg@10, recall@100}} for float32, float16, int8 and binary document vectors; the `+rescore`
    rows search the quantised index for `rescore_multiplier` x 100 candidates and re-rank them with the float
    query (sentence-transformers' rescoring)."""
    from sentence_transformers.util.quantization import quantize_embeddings, semantic_search_faiss

    def run_of(hits):
        # Hits come best first; binary scores are Hamming distances (lower is better), so rank, don't score.
        rows = zip(query_ids, hits, strict=True)
        return {q: {doc_ids[h["corpus_id"]]: float(len(row) - i) for i, h in enumerate(row)} for q, row in rows}

    k = min(100, len(doc_ids))

    def half(x):  # stored as float16, computed in float32
        return x.astype(np.float16).astype(np.float32)

    out = {
        "float32": score(qrels, dense_search(query_emb, doc_emb, query_ids, doc_ids, k), MRL_METRICS),
        "float16": score(qrels, dense_search(half(query_emb), half(doc_emb), query_ids, doc_ids, k), MRL_METRICS),
    }
    # ST's FAISS path does 8-bit scalar quantisation as uint8 (same bytes as int8, ranges calibrated on the corpus)
    for name, precision in (("int8", "uint8"), ("binary", "ubinary")):
        corpus = quantize_embeddings(doc_emb, precision=precision, calibration_embeddings=doc_emb)
        for rescore in (False, True):
            hits, _ = semantic_search_faiss(
                query_emb.astype(np.float32),
                corpus_embeddings=corpus,
                corpus_precision=precision,
                top_k=k,
                calibration_embeddings=doc_emb,
                rescore=rescore,
                rescore_multiplier=rescore_multiplier,
            )
            out[name + ("+rescore" if rescore else "")] = score(qrels, run_of(hits), MRL_METRICS)
    return out


def storage_table(doc_counts: list[int], dims: list[int], precisions=tuple(BYTES_PER_VALUE)) -> list[dict]:
    """Bytes of the document vectors, a flat index (the vectors themselves) and an HNSW index (the vectors
    plus 2*M 4-byte neighbour ids per vector on the bottom layer, ~1/M more above it), for each count,
    dimension and precision. Decimal units: 1 GB = 10^9 bytes."""
    rows = []
    for n in doc_counts:
        for dim in dims:
            for precision in precisions:
                vectors = n * int(np.ceil(dim * BYTES_PER_VALUE[precision]))
                graph = n * 2 * HNSW_M * 4 * (1 + 1 / (HNSW_M - 1))
                rows.append(
                    {
                        "documents": n,
                        "dim": dim,
                        "precision": precision,
                        "bytes_per_vector": vectors // n if n else 0,
                        "vectors_bytes": vectors,
                        "flat_index_bytes": vectors,
                        "hnsw_index_bytes": int(vectors + graph),
                    }
                )
    return rows


def summary(result: dict) -> dict:
    """Notebook 04's recommendation for the report: the dimension, its float32 bytes a vector, and the vectors'
    size for a million documents."""
    dim = result["recommended_dim"]
    [row] = storage_table([1_000_000], [dim], ["float32"])
    return {"recommended_dim": dim, "tolerance": result["tolerance"], "bytes_per_vector": row["bytes_per_vector"],
            "million_docs": human_bytes(row["vectors_bytes"])}  # fmt: skip


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000


def plot_dims(systems: dict[str, dict[str, dict[str, float]]], recommended: int | None, path=None):
    """NDCG@10 and Recall@100 against dimension, one line per system, the recommended dimension marked; saved as
    PNG when `path` is given. Returns the figure (a bare Figure: the notebook's plotting backend is left alone)."""
    from matplotlib.figure import Figure

    from .files import atomic_path

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, MRL_METRICS, strict=True):
        for name, curve in systems.items():
            dims = sorted(curve, key=int)
            ax.plot([int(d) for d in dims], [curve[d][metric] for d in dims], marker="o", label=name)
        if recommended:
            ax.axvline(recommended, color="k", linestyle="--", linewidth=1, label=f"recommended: {recommended}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dimension")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    return fig
