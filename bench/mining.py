"""Hard-negative mining at scale: time and peak memory of candidate retrieval (`embtune.search.top_k`, the search
`embtune.mine` ranks candidates with: exact, FAISS's flat inner-product index at every size) for 10k, 100k and
500k random unit vectors of 1,024 dimensions (Qwen3-Embedding-0.6B's size), 1,000 queries, top 60. Each
measurement runs in its own process so its peak memory is its own. Whether mined negatives pay is measured by
bench/train_quality.py (`ours+mined`).

    python bench/mining.py [--sizes 10000 100000 500000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_own_process, markdown_table, peak_rss_mb, report, save_results  # noqa: E402

DIM, QUERIES, TOP = 1024, 1000, 60
SEARCH = "exact (FAISS flat)"


def scale(n_docs: int) -> dict:
    import numpy as np

    from embtune.search import top_k

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((n_docs, DIM), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[rng.choice(n_docs, QUERIES, replace=False)] + 0.01
    start = time.perf_counter()
    top_k(queries, docs, TOP)
    return {
        "documents": n_docs,
        "search": SEARCH,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 500_000])
    parser.add_argument("--one", type=int)
    args = parser.parse_args()
    if args.one:
        report(scale(args.one))
        return
    scale_rows = [in_own_process(__file__, str(n)) for n in args.sizes]
    section = (
        "## Hard-negative mining\n\n`bench/mining.py`. Candidate retrieval (`embtune.search.top_k`: exact search "
        f"by FAISS's flat inner-product index), {QUERIES:,} queries, top {TOP}, {DIM}-dimensional random unit "
        "vectors:\n\n" + markdown_table(scale_rows, ["documents", "search", "seconds", "peak_rss_mb"])
    )
    section += "\n\nWhether mined negatives pay: see the fine-tuning quality table (`ours+mined` against `ours`)."
    save_results("mining", {"scale": scale_rows}, section)


if __name__ == "__main__":
    main()
