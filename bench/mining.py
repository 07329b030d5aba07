"""Hard-negative mining: does it pay, and what does it cost at scale?

1. Quality: all-MiniLM-L6-v2 trained with our recipe on SciFact train, with in-batch negatives only against
   with negatives mined by notebook 02's defaults, same rows and steps; NDCG@10 on the test split.
2. Scale: time and peak memory of candidate retrieval (`embtune.mine.dense_candidates`: exact below 100,000
   documents, FAISS above) for 10k, 100k and 500k random unit vectors of 1,024 dimensions (Qwen3-Embedding-0.6B's
   size), 1,000 queries, top 60. Each measurement runs in its own process so its peak memory is its own.

    python bench/mining.py [--skip-quality] [--sizes 10000 100000 500000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, markdown_table, minilm_path, peak_rss_mb, save_results, test_scores  # noqa: E402

DIM, QUERIES, TOP = 1024, 1000, 60


def scale(n_docs: int) -> dict:
    import numpy as np

    from embtune.mine import FAISS_MIN_DOCS, dense_candidates

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((n_docs, DIM), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.choice(n_docs, QUERIES, replace=False)] + 0.01
    start = time.perf_counter()
    dense_candidates(queries, docs, TOP)
    return {
        "documents": n_docs,
        "search": "faiss" if n_docs >= FAISS_MIN_DOCS else "exact",
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def quality(negatives: bool) -> dict:
    from embtune.data import load_beir
    from embtune.mine import mine, save
    from embtune.models import load_embedder
    from embtune.train import TrainConfig, train

    data_dir = str(SHARED / "scifact")
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        if negatives:
            model = load_embedder(minilm_path())
            save(*mine(model, minilm_path(), load_beir(data_dir, limits="off"), run_dir), run_dir)
        mined = time.perf_counter() - start
        log = train(TrainConfig(base_model=minilm_path(), data_dir=data_dir, run_dir=run_dir, max_seq_length=256))
        scores = test_scores(load_embedder(f"{run_dir}/model"), data_dir)
    return {
        "negatives": "mined (notebook 02 defaults)" if negatives else "in-batch only",
        **scores,
        "mine_s": round(mined, 1),
        "train_s": log["seconds"],
        "rows": log["n_train_rows"],
    }


def in_subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.rsplit("RESULT ", 1)[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--one", nargs=2)
    args = parser.parse_args()
    if args.one:
        kind, value = args.one
        print("RESULT " + json.dumps(scale(int(value)) if kind == "scale" else quality(value == "mined")))
        return
    scale_rows = [in_subprocess("--one", "scale", str(n)) for n in args.sizes]
    section = (
        "## Hard-negative mining\n\n`bench/mining.py`. Candidate retrieval, 1,000 queries, top 60, "
        f"{DIM}-dimensional random unit vectors:\n\n"
        + markdown_table(scale_rows, ["documents", "search", "seconds", "peak_rss_mb"])
    )
    results = {"scale": scale_rows}
    if not args.skip_quality:
        quality_rows = [in_subprocess("--one", "quality", kind) for kind in ("in-batch", "mined")]
        section += (
            "\n\nall-MiniLM-L6-v2 trained on SciFact train by our recipe, same rows and steps, scored on "
            "SciFact test:\n\n"
            + markdown_table(quality_rows, ["negatives", "ndcg@10", "mrr@10", "recall@100", "mine_s", "train_s"])
        )
        results["quality"] = quality_rows
    save_results("mining", results, section)


if __name__ == "__main__":
    main()
