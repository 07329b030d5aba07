"""Does Matryoshka training pay at small dimensions? all-MiniLM-L6-v2 on SciFact, CPU.

Our default recipe trained plainly against the same recipe with `matryoshka_dims` (notebook 03's option:
MatryoshkaLoss over 384, 256, 128, 64 and 32 dimensions), same data and steps; both, and the base model, scored
on SciFact test at each dimension (truncate, re-normalise) as notebook 04 scores them. Each system runs in its
own process; numbers go to docs/BENCHMARKS.md.

    python bench/mrl.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, markdown_table, minilm_path, save_results  # noqa: E402

DIMS = [384, 256, 128, 64, 32]
SEQ = 256


def one(system: str) -> dict:
    from embtune.data import load_beir
    from embtune.encode import encode
    from embtune.models import load_embedder
    from embtune.mrl import quality_by_dim
    from embtune.train import TrainConfig, train

    data_dir = str(SHARED / "scifact")
    with tempfile.TemporaryDirectory() as run_dir:
        path = minilm_path()
        if system != "base":
            dims = DIMS if system == "matryoshka" else None
            train(TrainConfig(base_model=path, data_dir=data_dir, run_dir=run_dir, max_seq_length=SEQ,
                              matryoshka_dims=dims))  # fmt: skip
            path = f"{run_dir}/model"
        model = load_embedder(path, device="cpu")
        data = load_beir(data_dir, limits="off")
        qrels = data.relevant("test")
        docs = data.doc_texts()
        doc_emb = encode(model, list(docs.values()))
        query_emb = encode(model, [data.queries[q] for q in qrels], "query")
        curve = quality_by_dim(query_emb, doc_emb, list(qrels), list(docs), qrels, DIMS)
    return {"system": system, **{f"ndcg@10 @{d}": curve[str(d)]["ndcg@10"] for d in DIMS}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one)))
        return
    rows = []
    for system in ("base", "plain", "matryoshka"):
        out = subprocess.run([sys.executable, __file__, "--one", system], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.rsplit("RESULT ", 1)[1]))
        print(rows[-1], flush=True)
    section = (
        "## Matryoshka training: SciFact test NDCG@10 by dimension\n\n"
        "`bench/mrl.py`: all-MiniLM-L6-v2, base; our default recipe (`plain`); the same with "
        f"`matryoshka_dims={DIMS}` (`matryoshka`); max {SEQ} tokens, same data and steps, on the CPU. Each "
        "dimension is the full vector truncated and re-normalised.\n\n"
        + markdown_table(rows, ["system", *[f"ndcg@10 @{d}" for d in DIMS]])
    )
    save_results("mrl", {"dims": DIMS, "rows": rows}, section)


if __name__ == "__main__":
    main()
