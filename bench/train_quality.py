"""Does fine-tuning pay, does our recipe beat the stock one, and do mined negatives beat in-batch ones?
all-MiniLM-L6-v2 on real data, CPU.

For each data set: the base model; the stock sentence-transformers recipe (MultipleNegativesRankingLoss,
in-batch negatives only, no-duplicates sampler, its default learning rate); our default recipe (`embtune.train`
with its defaults) on in-batch negatives only; and, on the data sets in `--mined`, the same recipe on the hard
negatives notebook 02 mines with its defaults — same batch size, same rows, same number of steps. Each system
runs in its own process so peak memory is its own. Scores are on the test split; numbers go to
docs/BENCHMARKS.md.

    python bench/train_quality.py [--datasets scifact wikiqa] [--mined scifact] [--epochs N] [--systems ours ...]

`--systems` (a system, or dataset/system) reruns only those; the other rows are carried over from the last results
file with the date they were measured on (the `measured` column), so a change to our recipe does not cost the stock
recipe's hour again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    DOCS,
    SHARED,
    in_own_process,
    markdown_table,
    minilm_path,
    peak_rss_mb,
    report,
    save_results,
    test_scores,
)

from embtune.train import TrainConfig  # noqa: E402

BATCH, SEQ = 32, 256
SYSTEMS = ["base", "stock", "ours", "ours+mined"]
RESULTS = DOCS / "benchmarks" / "train_quality.json"


def carried() -> list[dict]:
    """The last results file's rows, each with the date it was measured on."""
    if not RESULTS.exists():
        return []
    last = json.loads(RESULTS.read_text())
    return [{"shipped_t": "", **r, "measured": r.get("measured", last["date"])} for r in last["rows"]]


def stock_recipe(data_dir: str, out: str, epochs: float) -> None:
    """The sentence-transformers documentation's recipe, written out here so nothing of ours is in it."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.base.training_args import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from embtune.data import load_beir

    data = load_beir(data_dir, limits="off")
    docs = data.doc_texts()
    pairs = [(data.queries[q], docs[d]) for q, ds in data.relevant("train").items() for d in ds]
    model = SentenceTransformer(minilm_path())
    model.max_seq_length = SEQ
    args = Args(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        num_train_epochs=epochs,
        warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model)
    ).train()
    model.save(f"{out}/model")


def one(dataset: str, system: str, epochs: float) -> dict:
    from embtune.models import load_embedder
    from embtune.train import train

    data_dir = str(SHARED / dataset)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        if system == "base":
            path = minilm_path()
        elif system == "stock":
            stock_recipe(data_dir, run_dir, epochs)
            path = f"{run_dir}/model"
        else:
            if system == "ours+mined":
                from embtune.data import load_beir
                from embtune.mine import MineConfig, mine, save

                model = load_embedder(minilm_path(), device="cpu")
                config = MineConfig(data_dir=data_dir, run_dir=run_dir, base_model=minilm_path())  # its defaults
                save(*mine(model, minilm_path(), load_beir(data_dir, limits="off"), config), run_dir)
            log = train(
                TrainConfig(
                    base_model=minilm_path(),
                    data_dir=data_dir,
                    run_dir=run_dir,
                    batch_size=BATCH,
                    max_seq_length=SEQ,
                    epochs=epochs,
                )
            )
            path = f"{run_dir}/model"
        train_seconds = time.perf_counter() - start
        scores = test_scores(load_embedder(path, device="cpu"), path, data_dir, run_dir)
    return {
        "dataset": dataset,
        "system": system,
        **scores,
        "shipped_t": log["merge_with_base"] if system.startswith("ours") else "",
        "train_s": round(train_seconds, 1) if system != "base" else 0.0,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["scifact", "wikiqa"])
    parser.add_argument("--mined", nargs="*", default=["scifact"], help="data sets to also train on mined negatives")
    default_epochs = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "epochs")
    parser.add_argument("--epochs", type=float, default=default_epochs, help="default: our recipe's")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS,
                        help="rerun these (a system, or dataset/system); carry the others over")  # fmt: skip
    parser.add_argument("--one", nargs=2, metavar=("DATASET", "SYSTEM"))
    args = parser.parse_args()
    if args.one:
        report(one(*args.one, args.epochs))
        return
    rows = []
    for dataset in args.datasets:
        for system in ("base", "stock", "ours", *(["ours+mined"] if dataset in args.mined else [])):
            if system in args.systems or f"{dataset}/{system}" in args.systems:
                row = in_own_process(__file__, dataset, system, "--epochs", str(args.epochs))
                rows.append({**row, "measured": date.today().isoformat()})
                print(rows[-1], flush=True)
            else:
                rows += [r for r in carried() if (r["dataset"], r["system"]) == (dataset, system)]
    columns = ["dataset", "system", "ndcg@10", "mrr@10", "recall@100", "shipped_t", "train_s", "peak_rss_mb"]
    table = markdown_table(rows, [*columns, "measured"])
    section = (
        f"## Fine-tuning quality: all-MiniLM-L6-v2, test split\n\n"
        f"`bench/train_quality.py`: base, the stock sentence-transformers recipe (MNRL, in-batch negatives), "
        f"our default recipe on in-batch negatives (`ours`) and on notebook 02's mined negatives (`ours+mined`, "
        f"which includes the mining time); `shipped_t` is the slerp weight toward the trained model that the run "
        f"chose on dev and shipped as model/ (0: the base; the best t of the grid, kept when it beats the base in a "
        f"one-sided paired t-test on the dev queries); rows measured before 2026-11-29 shipped the model as trained "
        f"(blank `shipped_t`); batch {BATCH}, {args.epochs:g} epoch(s), max {SEQ} tokens, on the CPU; `train_s` "
        f"of a row measured while another job shared the 2 cores is longer than alone."
        f"\n\n" + table
    )
    save_results("train_quality", {"batch_size": BATCH, "epochs": args.epochs, "rows": rows}, section)


if __name__ == "__main__":
    main()
