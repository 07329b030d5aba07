"""Does Matryoshka training pay at small dimensions? all-MiniLM-L6-v2 on SciFact, CPU.

Our default recipe trained plainly against the same recipe with `matryoshka_dims` (notebook 03's option:
MatryoshkaLoss over 384, 256, 128, 64 and 32 dimensions), same data and steps; both, and the base model, scored
on SciFact test at each dimension (truncate, re-normalise) as notebook 04 scores them. Each system runs in its
own process; numbers go to docs/BENCHMARKS.md.

    python bench/mrl.py [--max-steps N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, in_own_process, markdown_table, minilm_path, report, save_results  # noqa: E402

DIMS = [384, 256, 128, 64, 32]
SEQ = 256
SYSTEMS = ("base", "plain", "matryoshka")


def one(system: str, max_steps: int = -1) -> dict:
    from embtune.data import DEFAULT_DOC_TEMPLATE, load_beir
    from embtune.encode import corpus_embeddings, encode
    from embtune.models import load_embedder
    from embtune.mrl import quality_by_dim
    from embtune.train import TrainConfig, train

    data_dir = str(SHARED / "scifact")
    with tempfile.TemporaryDirectory() as run_dir:
        path = minilm_path()
        if system != "base":
            dims = DIMS if system == "matryoshka" else None
            train(TrainConfig(base_model=path, data_dir=data_dir, run_dir=run_dir, max_seq_length=SEQ,
                              matryoshka_dims=dims, max_steps=max_steps))  # fmt: skip
            path = f"{run_dir}/model"
        model = load_embedder(path, device="cpu")
        data = load_beir(data_dir, limits="off")
        qrels = data.relevant("test")
        doc_emb = corpus_embeddings(model, path, data, run_dir, DEFAULT_DOC_TEMPLATE)
        query_emb = encode(model, [data.queries[q] for q in qrels], "query")
        curve = quality_by_dim(query_emb, doc_emb, list(qrels), list(data.corpus), qrels, DIMS)
    return {"system": system, **{f"ndcg@10 @{d}": curve[str(d)]["ndcg@10"] for d in DIMS}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=-1, help="training steps (default: the recipe's epochs)")
    parser.add_argument("--one", choices=SYSTEMS)
    args = parser.parse_args()
    if args.one:
        report(one(args.one, args.max_steps))
        return
    rows = []
    for system in SYSTEMS:
        rows.append(in_own_process(__file__, system, "--max-steps", str(args.max_steps)))
        print(rows[-1], flush=True)
    steps = "same data and steps" if args.max_steps < 0 else f"same data, {args.max_steps} steps"
    section = (
        "## Matryoshka training: SciFact test NDCG@10 by dimension\n\n"
        "`bench/mrl.py`: all-MiniLM-L6-v2, base; our default recipe (`plain`); the same with "
        f"`matryoshka_dims={DIMS}` (`matryoshka`); max {SEQ} tokens, {steps}, on the CPU. Each "
        "dimension is the full vector truncated and re-normalised.\n\n"
        + markdown_table(rows, ["system", *[f"ndcg@10 @{d}" for d in DIMS]])
    )
    save_results("mrl", {"dims": DIMS, "max_steps": args.max_steps, "rows": rows}, section)


if __name__ == "__main__":
    main()
