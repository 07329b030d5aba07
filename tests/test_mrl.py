"""Notebook 04's library: dimensions, truncation, precision and the storage bill."""

import numpy as np
import pytest

from embtune.encode import encode, truncate
from embtune.evaluate import score
from embtune.mrl import dims_for, human_bytes, quality_by_dim, quality_by_precision, recommended_dim, storage_table
from embtune.search import dense_search


def test_dims_are_capped_at_the_model_size():
    assert dims_for(384) == [384, 256, 128, 64, 32]
    assert dims_for(1024) == [1024, 768, 512, 384, 256, 128, 64, 32]
    assert dims_for(4096)[:2] == [4096, 1024]
    assert dims_for(100, [None, 64, 200, 64]) == [100, 64]


def test_truncation_renormalises_and_keeps_the_leading_coordinates():
    rng = np.random.default_rng(0)
    full = truncate(rng.standard_normal((5, 64)).astype(np.float32), None)
    cut = truncate(full, 16)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cut * np.linalg.norm(full[:, :16], axis=1, keepdims=True), full[:, :16], rtol=1e-5)


def test_storage_arithmetic_on_known_cases():
    [guide] = storage_table([100_000_000], [4096], ["float32"])
    assert guide["vectors_bytes"] == 100_000_000 * 4096 * 4 == 1_638_400_000_000  # 1.6 TB, not 16 GB
    assert human_bytes(guide["vectors_bytes"]) == "1.6 TB"
    rows = {(r["dim"], r["precision"]): r for r in storage_table([1_000_000], [1024, 384])}
    assert rows[(1024, "binary")]["bytes_per_vector"] == 128 and rows[(384, "int8")]["vectors_bytes"] == 384_000_000
    assert rows[(1024, "float16")]["flat_index_bytes"] == 2048 * 1_000_000
    # HNSW adds 2*M int32 neighbour ids per vector (M = 32) and about 1/(M-1) of that on upper layers
    assert rows[(384, "float32")]["hnsw_index_bytes"] == pytest.approx(1_000_000 * (1536 + 256 * 32 / 31), rel=1e-6)
    assert human_bytes(999) == "999 B" and human_bytes(1_500_000) == "1.5 MB"


def test_recommended_dim_is_the_smallest_within_tolerance():
    curve = {"384": {"ndcg@10": 0.60}, "256": {"ndcg@10": 0.596}, "128": {"ndcg@10": 0.58}, "64": {"ndcg@10": 0.5}}
    assert recommended_dim(curve, 0.01) == 256 and recommended_dim(curve, 0.05) == 128
    assert recommended_dim(curve, 0.0) == 384


def test_quality_by_dimension_and_precision_on_real_embeddings(minilm, pydocs_minilm):
    data, _, doc_emb = pydocs_minilm
    qrels = data.relevant("test")
    query_ids, docs = list(qrels), data.doc_texts()
    query_emb = encode(minilm, [data.queries[q] for q in query_ids], "query", progress=False)
    curve = quality_by_dim(query_emb, doc_emb, query_ids, list(docs), qrels, dims_for(384))
    assert list(curve) == ["384", "256", "128", "64", "32"] and set(curve["32"]) == {"ndcg@10", "recall@100"}
    full = score(qrels, dense_search(query_emb, doc_emb, query_ids, list(docs)), ["ndcg@10"])["ndcg@10"]
    assert curve["384"]["ndcg@10"] == full > curve["32"]["ndcg@10"]  # 32 dims of a non-MRL model lose quality
    rows = quality_by_precision(query_emb, doc_emb, query_ids, list(docs), qrels)
    assert list(rows) == ["float32", "float16", "int8", "int8+rescore", "binary", "binary+rescore"]
    assert rows["float32"]["ndcg@10"] == full and abs(rows["float16"]["ndcg@10"] - full) < 0.005
    assert rows["int8"]["ndcg@10"] > 0.8 * full and rows["binary"]["ndcg@10"] > 0.5 * full  # Hamming: lower wins
    assert rows["binary+rescore"]["ndcg@10"] > rows["binary"]["ndcg@10"]
