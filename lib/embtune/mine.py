"""Hard-negative mining for BEIR data, with each false-negative filter a parameter and each one counted.

Written here rather than through sentence-transformers' `mine_hard_negatives`, which works on texts, not ids,
has no BM25 candidates, excludes only the row's own positive (not every labelled positive of the query) and
does not report what each filter removed. Its ideas are kept: a rank window, top or random sampling, a
relative margin to the positive's score (NV-Retriever's TopK-PercPos), an absolute ceiling, cross-encoder
rescoring. The corpus is embedded once per model and data and cached in the run directory.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data import DEFAULT_DOC_TEMPLATE, BeirData, TrainingLabels, training_labels
from .encode import encode
from .files import atomic_path

FAISS_MIN_DOCS = 100_000  # above this, a FAISS index instead of one dense matrix product per query batch


@dataclass
class MineConfig:
    candidates: str = "dense"  # dense | bm25 | both
    num_negatives: int = 5
    range_min: int = 0  # skip this many top candidates (after removing the query's positives)
    range_max: int = 50  # look no deeper than this rank
    sampling: str = "top"  # top | random (within the window)
    relative_margin: float | None = 0.95  # keep a negative only if its score < margin x the positive's score
    max_score: float | None = None  # and below this absolute score
    reranker: str | None = None  # a Qwen3-Reranker or sentence-transformers CrossEncoder to rescore with
    reranker_threshold: float = 0.5  # drop a negative the reranker scores above this (P(relevant))
    near_duplicate: float | None = 0.98  # drop a negative this similar (cosine) to the positive, or equal text
    bm25_stopwords: str | None = "en"  # None for languages bm25s has no stop-word list for
    seed: int = 42
    batch_size: int = 32


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def cache_key(model_path: str, data: BeirData, template: str) -> str:
    """Changes when the model, the documents or the way they are joined change."""
    h = hashlib.sha256()
    for part in (str(Path(model_path).resolve()) if Path(model_path).exists() else model_path, template):
        h.update(part.encode())
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    for w in weights:
        h.update(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
    for doc_id, doc in data.corpus.items():
        h.update(f"{doc_id}\0{doc['title']}\0{doc['text']}\0".encode())
    return h.hexdigest()[:16]


def corpus_embeddings(
    model,
    model_path: str,
    data: BeirData,
    run_dir: str | Path,
    template: str = DEFAULT_DOC_TEMPLATE,
    batch_size: int = 32,
) -> np.ndarray:
    """The corpus embedded once, cached as `run_dir/cache/corpus-<key>.npy` for every later step."""
    path = Path(run_dir) / "cache" / f"corpus-{cache_key(model_path, data, template)}.npy"
    if path.exists():
        return np.load(path)
    texts = list(data.doc_texts(template).values())
    embeddings = encode(model, texts, "document", batch_size=batch_size)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, embeddings)
    return embeddings


def memory_estimate(n_docs: int, dim: int, use_faiss: bool) -> str:
    vectors = n_docs * dim * 4
    index = vectors if use_faiss else 0
    return f"{n_docs:,} x {dim} float32 vectors: {vectors / 2**20:,.0f} MiB" + (
        f" + FAISS index {index / 2**20:,.0f} MiB" if use_faiss else ""
    )


def dense_candidates(query_emb: np.ndarray, doc_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of the top-k documents per query by cosine; FAISS above FAISS_MIN_DOCS."""
    k = min(k, len(doc_emb))
    if len(doc_emb) >= FAISS_MIN_DOCS:
        import faiss

        index = faiss.IndexFlatIP(doc_emb.shape[1])
        index.add(doc_emb)
        return index.search(query_emb, k)
    scores, indices = [], []
    for start in range(0, len(query_emb), 256):
        sims = query_emb[start : start + 256] @ doc_emb.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        indices.append(top)
        scores.append(np.take_along_axis(sims, top, axis=1))
    return np.vstack(scores), np.vstack(indices)


def bm25_candidates(
    queries: list[str], docs: list[str], k: int, stopwords: str | None = "en"
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of the top-k documents per query by BM25 (bm25s), best first."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords=stopwords, show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords=stopwords, show_progress=False)
    indices, scores = retriever.retrieve(tokens, k=min(k, len(docs)), show_progress=False)
    return scores, indices


FILTERS = ("duplicate", "relative_margin", "max_score", "reranker")


def training_pairs(data: BeirData, run_dir: str | Path) -> tuple[TrainingLabels, list[tuple[str, str]], dict]:
    """The training labels, their (query id, positive id) pairs, and every labelled positive of each query in
    any split (none of which may become one of its negatives)."""
    labels = training_labels(data, run_dir)
    positives = {q: set(docs) for q, docs in labels.qrels.items()}
    for split in data.qrels:
        for q, docs in data.relevant(split).items():
            positives.setdefault(q, set()).update(docs)
    pairs = [(q, d) for q in sorted(labels.qrels) for d in sorted(labels.qrels[q])]
    return labels, pairs, positives


def mine(
    model,
    model_path: str,
    data: BeirData,
    run_dir: str | Path,
    config: MineConfig | None = None,
    instruction: str | None = None,
    template: str = DEFAULT_DOC_TEMPLATE,
    reranker=None,
):
    """Hard negatives for every training pair (see `training_pairs`). Returns (rows, stats): one row per
    (query, positive) in notebook 02's output format, and the counts of what each filter removed."""
    from tqdm.auto import tqdm

    config = config or MineConfig()
    labels, pairs, positives = training_pairs(data, run_dir)
    if config.candidates not in ("dense", "bm25", "both") or config.sampling not in ("top", "random"):
        raise ValueError(f"candidates must be dense|bm25|both and sampling top|random, got {config}")
    docs = data.doc_texts(template)
    doc_ids, doc_texts = list(docs), list(docs.values())
    row_of = {d: i for i, d in enumerate(doc_ids)}
    doc_emb = corpus_embeddings(model, model_path, data, run_dir, template, config.batch_size)
    print(memory_estimate(len(doc_ids), doc_emb.shape[1], len(doc_ids) >= FAISS_MIN_DOCS), flush=True)
    query_ids = sorted({q for q, _ in pairs})
    query_text = {q: labels.queries[q] for q in query_ids}
    query_emb = encode(model, [query_text[q] for q in query_ids], "query", instruction, batch_size=config.batch_size)
    depth = config.range_max + max(len(p) for p in positives.values())  # the window survives their removal
    candidates = _ranked_candidates(config, query_ids, query_text, query_emb, doc_texts, doc_emb, depth)
    q_row = {q: i for i, q in enumerate(query_ids)}
    rng = random.Random(config.seed)
    stats = {
        "queries": len(query_ids),
        "pairs": len(pairs),
        "candidates_seen": 0,
        "labelled_positives_excluded": 0,
        "removed": dict.fromkeys(FILTERS, 0),
        "passed_filters": 0,
        "kept": 0,
        "pairs_with_fewer_negatives": 0,
        "unsupervised_pairs": 0,
        "config": asdict(config),
    }
    survivors = []
    for qid, pos_id in tqdm(pairs, desc="Filtering negatives"):
        qe, pe, pos_text = query_emb[q_row[qid]], doc_emb[row_of[pos_id]], _normalized(docs[pos_id])
        if qid in labels.views:
            # ICT/crop pairs: the positive is a view of the document, not a relevance judgement, so the nearest
            # other documents are often just as relevant; like ICT and Contriever, they train on in-batch
            # negatives only (SciFact without labels: mined negatives turned a gain over the base into a loss).
            stats["unsupervised_pairs"] += 1
            survivors.append((qid, pos_id, float(qe @ pe), []))
            continue
        ranked = [i for i in candidates[qid] if doc_ids[i] not in positives[qid]]
        stats["labelled_positives_excluded"] += len(candidates[qid]) - len(ranked)
        window = ranked[config.range_min : config.range_max]
        stats["candidates_seen"] += len(window)
        pos_score = float(qe @ pe)
        kept = []
        for i in window:
            score = float(qe @ doc_emb[i])
            if config.near_duplicate is not None and (
                _normalized(doc_texts[i]) == pos_text or float(pe @ doc_emb[i]) >= config.near_duplicate
            ):
                stats["removed"]["duplicate"] += 1
            elif config.relative_margin is not None and score >= config.relative_margin * pos_score:
                stats["removed"]["relative_margin"] += 1
            elif config.max_score is not None and score > config.max_score:
                stats["removed"]["max_score"] += 1
            else:
                kept.append((i, score))
        survivors.append((qid, pos_id, pos_score, kept))
    if reranker is not None:
        survivors = _rerank_filter(reranker, survivors, query_text, doc_texts, config, stats)
    rows = []
    for qid, pos_id, pos_score, kept in survivors:
        stats["passed_filters"] += len(kept)
        chosen = (
            kept[: config.num_negatives]
            if config.sampling == "top"
            else sorted(rng.sample(kept, min(config.num_negatives, len(kept))), key=lambda x: -x[1])
        )
        stats["kept"] += len(chosen)
        stats["pairs_with_fewer_negatives"] += len(chosen) < config.num_negatives and qid not in labels.views
        rows.append(
            {
                "query_id": qid,
                "query": query_text[qid],
                "positive_id": pos_id,
                "positive": labels.positive_text(qid, pos_id, docs, template),
                "negative_ids": [doc_ids[i] for i, _ in chosen],
                "negatives": [doc_texts[i] for i, _ in chosen],
                "positive_score": round(pos_score, 6),
                "negative_scores": [round(s, 6) for _, s in chosen],
            }
        )
    return rows, stats


def _ranked_candidates(config, query_ids, query_text, query_emb, doc_texts, doc_emb, depth) -> dict[str, list]:
    """Candidate document rows per query: by the embedder, by BM25, or their union ranked by the embedder."""
    dense = lexical = None
    if config.candidates in ("dense", "both"):
        dense = dense_candidates(query_emb, doc_emb, depth)[1]
    if config.candidates in ("bm25", "both"):
        _, lexical = bm25_candidates([query_text[q] for q in query_ids], doc_texts, depth, config.bm25_stopwords)
    if lexical is None:
        return {q: list(row) for q, row in zip(query_ids, dense, strict=True)}
    if dense is None:
        return {q: list(row) for q, row in zip(query_ids, lexical, strict=True)}
    return {
        q: sorted(set(d) | set(b), key=lambda i: -float(doc_emb[i] @ qe))
        for q, qe, d, b in zip(query_ids, query_emb, dense, lexical, strict=True)
    }


def _rerank_filter(reranker, survivors, query_text, doc_texts, config: MineConfig, stats):
    """Drop the negatives a reranker judges relevant (score above the threshold)."""
    pairs = [(query_text[qid], doc_texts[i]) for qid, _, _, kept in survivors for i, _ in kept]
    scores = iter(reranker.predict(pairs, batch_size=config.batch_size, show_progress_bar=True)) if pairs else iter(())
    out = []
    for qid, pos_id, pos_score, kept in survivors:
        verdicts = [float(next(scores)) for _ in kept]
        stats["removed"]["reranker"] += sum(v > config.reranker_threshold for v in verdicts)
        out.append(
            (qid, pos_id, pos_score, [k for k, v in zip(kept, verdicts, strict=True) if v <= config.reranker_threshold])
        )
    return out


def save(rows: list[dict], stats: dict, run_dir: str | Path) -> Path:
    """`run_dir/hard_negatives/train.jsonl` and `stats.json`, each written whole or not at all."""
    import json

    from .files import write_json

    folder = Path(run_dir) / "hard_negatives"
    with atomic_path(folder / "train.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    write_json(folder / "stats.json", stats)
    return folder
