"""Notebook 02: hard-negative mining for BEIR data, with each false-negative filter a parameter and each one counted.

Written here rather than through sentence-transformers' `mine_hard_negatives`, which works on texts, not ids,
has no BM25 candidates, excludes only the row's own positive (not every labelled positive of the query) and
does not report what each filter removed. Its ideas are kept: a rank window, top or random sampling, a
relative margin to the positive's score (NV-Retriever's TopK-PercPos), an absolute ceiling, cross-encoder
rescoring. The corpus embeddings come from the run's cache (`encode.corpus_embeddings`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import POSITIVE, Reuse, StepConfig, TrainingData, at_least, between, one_of
from .data import BeirData, TrainingLabels, normalize_text, training_labels
from .encode import corpus_embeddings, encode
from .files import atomic_path, write_json
from .rundir import RunDir, data_fingerprint, fingerprint, make_manifest, model_fingerprint
from .search import bm25_top_k, index_memory, top_k

FILTERS = ("duplicate", "relative_margin", "max_score", "reranker")


@dataclass(kw_only=True)
class MineConfig(StepConfig, Reuse, TrainingData):
    candidates: str = "dense"  # dense | bm25 | both
    num_negatives: int = 5
    range_min: int = 0  # skip this many top candidates (after removing the query's positives)
    range_max: int = 50  # look no deeper than this rank
    sampling: str = "top"  # top | random (within the window)
    relative_margin: float | None = 0.95  # keep a negative only if its score < margin x the positive's score
    max_score: float | None = None  # and below this absolute score
    veto_reranker: str | None = None  # a Qwen3-Reranker or CrossEncoder that vetoes likely positives
    reranker_threshold: float = 0.5  # drop a negative the reranker scores above this (P(relevant))
    near_duplicate: float | None = 0.98  # drop a negative this similar (cosine) to the positive, or equal text
    bm25_stopwords: str | None = "en"  # None for languages bm25s has no stop-word list for
    batch_size: int = 32

    RULES = {"candidates": one_of("dense", "bm25", "both"), "num_negatives": at_least(1), "range_min": at_least(0),
             "range_max": at_least(1), "sampling": one_of("top", "random"), "relative_margin": POSITIVE,
             "reranker_threshold": between(0, 1), "near_duplicate": between(0, 1, low_open=True),
             "batch_size": at_least(1)}  # fmt: skip


def training_pairs(data: BeirData, run_dir: str | Path, split_overlap: str = "error"):
    """(labels, pairs, positives): the training labels, their (query id, positive id) pairs, and every labelled
    positive of each query in any split (none of which may become one of its negatives)."""
    labels = training_labels(data, run_dir, split_overlap)
    positives = {q: set(docs) for q, docs in labels.qrels.items()}
    for split in data.qrels:
        for q, docs in data.relevant(split).items():
            positives.setdefault(q, set()).update(docs)
    pairs = [(q, d) for q in sorted(labels.qrels) for d in sorted(labels.qrels[q])]
    return labels, pairs, positives


def manifest(config: MineConfig, model_path: str, labels: TrainingLabels) -> dict:
    """What the mined negatives are made from: data, embedder, synthetic queries when used, veto, settings."""
    run = RunDir(config.run_dir)
    inputs = {"data": data_fingerprint(config.data_dir), "base_model": model_fingerprint(model_path),
              "synthetic": fingerprint(run.manifest("synthetic")) if labels.uses_synthetic else None,
              "veto_reranker": model_fingerprint(config.veto_reranker) if config.veto_reranker else None}  # fmt: skip
    shaping = {k: v for k, v in asdict(config).items() if k not in ("data_dir", "run_dir", "base_model",
                                                                      "batch_size", "reuse")}  # fmt: skip
    return make_manifest(inputs, shaping)


def mine(model, model_path: str, data: BeirData, config: MineConfig, reranker=None):
    """Hard negatives for every training pair (see `training_pairs`). Returns (rows, stats): one row per
    (query, positive) in notebook 02's output format, and the counts of what each filter removed. Negatives a
    previous run mined from the same inputs and settings are read back instead (`reuse`).
    `reranker`: a loaded reranker for the veto; by default `config.veto_reranker` is loaded when set."""
    from tqdm.auto import tqdm

    labels, pairs, positives = training_pairs(data, config.run_dir, config.split_overlap)
    run = RunDir(config.run_dir)
    made_from = manifest(config, model_path, labels)
    if run.reusable("hard_negatives", made_from, config.reuse, [run.hard_negatives.parent]):
        print(f"{run.hard_negatives.parent}: mined from the same inputs and settings; reused", flush=True)
        rows = [json.loads(line) for line in run.hard_negatives.read_text(encoding="utf-8").splitlines()]
        return rows, json.loads((run.hard_negatives.parent / "stats.json").read_text(encoding="utf-8"))
    if config.candidates not in ("dense", "bm25", "both") or config.sampling not in ("top", "random"):
        raise ValueError(f"candidates must be dense|bm25|both and sampling top|random, got {config}")
    if reranker is None and config.veto_reranker:
        from .rerank import load_reranker

        reranker = load_reranker(config.veto_reranker)
    docs = data.doc_texts(config.doc_template)
    doc_ids, doc_texts = list(docs), list(docs.values())
    row_of = {d: i for i, d in enumerate(doc_ids)}
    doc_emb = corpus_embeddings(model, model_path, data, config.run_dir, config.doc_template, config.batch_size)
    print(index_memory(len(doc_ids), doc_emb.shape[1]), flush=True)
    query_ids = sorted({q for q, _ in pairs})
    query_text = {q: labels.queries[q] for q in query_ids}
    query_emb = encode(model, list(query_text.values()), "query", config.instruction, batch_size=config.batch_size)
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
        "made_from": made_from,
    }
    survivors = []
    for qid, pos_id in tqdm(pairs, desc="Filtering negatives"):
        qe, pe, pos_text = query_emb[q_row[qid]], doc_emb[row_of[pos_id]], normalize_text(docs[pos_id])
        if qid in labels.views:
            # ICT/crop pairs: the positive is a view of the document, not a relevance judgement, so the nearest
            # other documents are often just as relevant; like ICT and Contriever, they train on in-batch
            # negatives only.
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
                normalize_text(doc_texts[i]) == pos_text or float(pe @ doc_emb[i]) >= config.near_duplicate
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
                "positive": labels.positive_text(qid, pos_id, docs, config.doc_template),
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
        dense = top_k(query_emb, doc_emb, depth)[1]
    if config.candidates in ("bm25", "both"):
        _, lexical = bm25_top_k([query_text[q] for q in query_ids], doc_texts, depth, config.bm25_stopwords)
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
    """`run_dir/hard_negatives/train.jsonl` and `stats.json`, each written whole or not at all, and the record
    of what they were made from (`stats["made_from"]`), written last."""
    run = RunDir(run_dir)
    run.forget("hard_negatives")
    with atomic_path(run.hard_negatives) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    write_json(run.hard_negatives.parent / "stats.json", stats)
    run.record("hard_negatives", stats["made_from"])
    return run.hard_negatives.parent
