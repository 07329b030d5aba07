"""Retrieval: exact dense top-k, BM25 and rank fusion, the one place that mining, evaluation, synthetic-query
filtering and the notebooks search.

A "run" is {query id: {doc id: score}} for the top-k documents of each query, the shape ranx and TREC tools use,
so any system (dense, BM25, fused, reranked) is scored the same way. A query a system finds nothing for has an
empty entry: it scores 0, and `empty_queries` counts them.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from .data import NO_SPACES
from .encode import encode


def top_k(query_emb: np.ndarray, doc_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of the k best documents per query by inner product (cosine for unit vectors), best first.
    Exact search by FAISS's flat index: batched BLAS, from a few documents to millions."""
    import faiss

    k = min(k, len(doc_emb))
    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(np.ascontiguousarray(doc_emb, dtype=np.float32))
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)


def index_memory(n_docs: int, dim: int) -> str:
    """What exact search holds in memory: the vectors and FAISS's copy of them."""
    vectors = n_docs * dim * 4
    return f"{n_docs:,} x {dim} float32 vectors: {vectors / 2**20:,.0f} MiB + flat index {vectors / 2**20:,.0f} MiB"


def dense_search(query_emb, doc_emb, query_ids: list[str], doc_ids: list[str], k: int = 100) -> dict:
    """A run from query and document embeddings."""
    scores, indices = top_k(query_emb, doc_emb, k)
    return {
        q: {doc_ids[i]: float(s) for i, s in zip(row, srow, strict=True) if i >= 0}
        for q, row, srow in zip(query_ids, indices, scores, strict=True)
    }


def dense_run(model, queries: dict[str, str], doc_emb, doc_ids: list[str], instruction: str | None = None,
              k: int = 100, batch_size: int = 32) -> dict:  # fmt: skip
    """Encode the queries (with the instruction) and search the document embeddings."""
    query_emb = encode(model, list(queries.values()), "query", instruction, batch_size=batch_size)
    return dense_search(query_emb, doc_emb, list(queries), doc_ids, k)


# bm25s's tokeniser (scikit-learn's `\w\w+`) makes a whole sentence of a script without spaces one token, so no
# Chinese query ever matches. Overlapping character bigrams (unigrams for one-character runs) are what Lucene's
# CJKAnalyzer indexes: no dictionary, every such script, and close to a word segmenter such as jieba on Chinese
# retrieval, which would cover Chinese alone and add a dependency.
_TOKENS = re.compile(rf"([{NO_SPACES}]+)|([^\W{NO_SPACES}]{{2,}})")


def bm25_tokens(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Lower-cased words of two or more characters (stop words out), and character bigrams of text in scripts
    without spaces."""
    tokens = []
    for run, word in _TOKENS.findall(text.lower()):
        if run:
            tokens += [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
        elif word not in stopwords:
            tokens.append(word)
    return tokens


def _stopwords(language: str | None) -> frozenset[str]:
    from bm25s.tokenization import _infer_stopwords

    return frozenset(_infer_stopwords(language)) if language else frozenset()


def bm25_top_k(queries: list[str], docs: list[str], k: int, stopwords: str | None = "en"):
    """(scores, indices) of the k best documents per query by BM25 (bm25s), best first; score 0 is no match."""
    import bm25s

    stop = _stopwords(stopwords)
    retriever = bm25s.BM25()
    retriever.index([bm25_tokens(d, stop) for d in docs], show_progress=False)
    vocab = retriever.vocab_dict
    # Query words the corpus never uses cannot score; bm25s needs them out.
    tokens = [[t for t in bm25_tokens(q, stop) if t in vocab] for q in queries]
    indices, scores = retriever.retrieve(tokens, k=min(k, len(docs)), show_progress=False)
    return scores, indices


def bm25_search(queries: dict[str, str], docs: dict[str, str], k: int = 100, stopwords: str | None = "en") -> dict:
    """A BM25 run; documents that match no query word are left out (an empty entry when none match)."""
    doc_ids = list(docs)
    scores, indices = bm25_top_k(list(queries.values()), list(docs.values()), k, stopwords)
    return {
        q: {doc_ids[i]: float(s) for i, s in zip(row, srow, strict=True) if s > 0}
        for q, row, srow in zip(queries, indices, scores, strict=True)
    }


def empty_queries(run: dict) -> int:
    """How many queries a system retrieved nothing for."""
    return sum(not docs for docs in run.values())


def fuse(runs: list[dict], method: str = "rrf", weights: list[float] | None = None, k: int = 60) -> dict:
    """Hybrid retrieval by ranx's fusion: reciprocal rank fusion (`rrf`, constant `k`) or a weighted sum of
    min-max normalised scores (`wsum`, `weights` default equal). A query no system found anything for stays empty."""
    from ranx import Run
    from ranx import fuse as ranx_fuse

    if method not in ("rrf", "wsum"):
        raise ValueError(f'method must be "rrf" or "wsum", not {method!r}')
    weights = weights or [1 / len(runs)] * len(runs)
    queries = list(dict.fromkeys(q for run in runs for q in run))
    # ranx fuses runs that hold the same queries, each with at least one document. A system that found nothing
    # for a query adds nothing to its fused scores (in both methods), so queries are fused in groups by which
    # systems found something; where only one did, its ranking is the fused one.
    groups: dict[tuple[int, ...], list[str]] = {}
    for q in queries:
        groups.setdefault(tuple(i for i, run in enumerate(runs) if run.get(q)), []).append(q)
    fused = {q: {} for q in queries}
    for present, group in groups.items():
        if len(present) == 1:
            fused.update({q: dict(runs[present[0]][q]) for q in group})
        elif present:
            ranx_runs = [Run({q: dict(runs[i][q]) for q in group}, name=f"run{i}") for i in present]
            if method == "rrf":
                with warnings.catch_warnings():  # numba's "unsafe cast from uint64 to int64" inside ranx: ranks fit
                    warnings.filterwarnings("ignore", message="unsafe cast")
                    result = ranx_fuse(ranx_runs, norm=None, method="rrf", params={"k": k})
            else:
                result = ranx_fuse(ranx_runs, norm="min-max", method="wsum",
                                   params={"weights": [weights[i] for i in present]})  # fmt: skip
            fused.update({q: dict(docs) for q, docs in result.to_dict().items()})
    return fused
