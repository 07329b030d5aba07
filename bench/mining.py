"""Hard-negative mining at scale: time and peak memory of candidate retrieval (`embtune.mine.dense_candidates`:
exact below 100,000 documents, FAISS above) for 10k, 100k and 500k random unit vectors of 1,024 dimensions
(Qwen3-Embedding-0.6B's size), 1,000 queries, top 60. Each measurement runs in its own process so its peak
memory is its own. Whether mined negatives pay is measured by bench/train_quality.py (`ours+mined`).

    python bench/mining.py [--sizes 10000 100000 500000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, peak_rss_mb, save_results  # noqa: E402

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


def in_subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.rsplit("RESULT ", 1)[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--one", type=int)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(scale(args.one)))
        return
    scale_rows = [in_subprocess("--one", str(n)) for n in args.sizes]
    section = (
        "## Hard-negative mining\n\n`bench/mining.py`. Candidate retrieval, 1,000 queries, top 60, "
        f"{DIM}-dimensional random unit vectors:\n\n"
        + markdown_table(scale_rows, ["documents", "search", "seconds", "peak_rss_mb"])
    )
    section += "\n\nWhether mined negatives pay: see the fine-tuning quality table (`ours+mined` against `ours`)."
    save_results("mining", {"scale": scale_rows}, section)


if __name__ == "__main__":
    main()
