"""Synthetic queries: does training on them pay when a corpus has no labels? all-MiniLM-L6-v2 on SciFact, CPU.

SciFact's train labels are withheld (a copy of the folder without qrels/train.tsv, made of links). For each
generator, notebook 01 writes queries for the same seeded sample of documents with its default filters, and
notebook 03's default recipe trains on them (no mined negatives, to isolate the queries); scores are on the test
split. Generators: the inverse cloze task and cropping (no LLM), and the offline SmolLM2-135M-Instruct (GGUF,
in process). Each system runs in its own process; numbers go to docs/BENCHMARKS.md.

    python bench/synthetic.py [--documents 500] [--llm-documents 48] [--generators ict crop smollm2] [--fresh]

SmolLM2 writes slowly on a CPU (its `generate_s` in docs/BENCHMARKS.md), so it gets a smaller sample
(`--llm-documents`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    DOCS,
    SHARED,
    in_own_process,
    markdown_table,
    minilm_path,
    report,
    save_results,
    smollm2_gguf,
    test_scores,
)

SEQ = 256
COLUMNS = ["generator", "ndcg@10", "mrr@10", "recall@100", "ndcg@10 as trained", "documents", "kept", "generate_s",
           "train_s"]  # fmt: skip


def unlabelled(dataset: str, folder: Path) -> Path:
    """`dataset` without its train (and dev) labels: links to the corpus, the queries and the test split."""
    source = SHARED / dataset
    (folder / "qrels").mkdir(parents=True)
    corpus = next(p.name for p in (source / "corpus.jsonl", source / "corpus.jsonl.gz") if p.exists())
    for name in (corpus, "queries.jsonl", "qrels/test.tsv"):
        (folder / name).symlink_to(source / name)
    return folder


def one(generator: str, documents: int) -> dict:
    from embtune.data import load_beir
    from embtune.models import load_embedder
    from embtune.synthetic import SynthConfig, generate
    from embtune.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = unlabelled("scifact", Path(tmp) / "data")
        run_dir = Path(tmp) / "run"
        base = minilm_path()
        if generator == "base":
            return {"generator": "none (base model)", **test_scores(load_embedder(base), base, data_dir, run_dir)}
        start = time.perf_counter()
        name = str(smollm2_gguf()) if generator == "smollm2" else generator
        # max_new_tokens: queries are short
        config = SynthConfig(data_dir=str(data_dir), run_dir=str(run_dir), base_model=base, generator_model=name,
                             max_documents=documents, max_new_tokens=64)  # fmt: skip
        data = load_beir(data_dir, limits="off")
        stats = generate(load_embedder(base), base, data, config)
        generated = time.perf_counter() - start
        row = {
            "generator": "SmolLM2-135M-Instruct" if generator == "smollm2" else stats["generator"],
            "documents": stats["documents"],
            "kept": stats["kept"],
            "generate_s": round(generated, 1),
        }
        if stats["kept"] < 2:
            return row  # nothing to train on (a batch needs two pairs)
        log = train(TrainConfig(base_model=base, data_dir=str(data_dir), run_dir=str(run_dir), max_seq_length=SEQ))
        merged = str(run_dir / "model")
        scores = test_scores(load_embedder(merged), merged, data_dir, run_dir)
        # the default merges half-way back to the base (no human labels); the model as trained, for comparison
        finetuned = log["finetuned_model"]
        trained = test_scores(load_embedder(finetuned), finetuned, data_dir, run_dir)["ndcg@10"]
    return {**row, **scores, "ndcg@10 as trained": trained, "train_s": log["seconds"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=500)
    parser.add_argument("--llm-documents", type=int, default=48)
    parser.add_argument("--generators", nargs="+", default=["ict", "crop", "smollm2"])
    parser.add_argument("--fresh", action="store_true", help="rerun every row, not only the missing ones")
    parser.add_argument("--one")
    args = parser.parse_args()
    if args.one:
        report(one(args.one, args.documents))
        return
    settings = {"documents": args.documents, "llm_documents": args.llm_documents}
    saved = DOCS / "benchmarks" / "synthetic.json"
    previous = json.loads(saved.read_text()) if saved.exists() and not args.fresh else {}
    # Each row is saved as it finishes; a rerun with the same settings keeps the finished rows.
    done = {r["key"]: r for r in previous.get("rows", []) if "key" in r} if previous.get("settings") == settings else {}
    rows = []
    for generator in ["base", *args.generators]:
        if generator in done:
            rows.append(done[generator])
            continue
        n = args.llm_documents if generator == "smollm2" else args.documents
        rows.append({"key": generator, **in_own_process(__file__, generator, "--documents", str(n))})
        print(rows[-1], flush=True)
        save(rows, settings)


def save(rows: list[dict], settings: dict) -> None:
    section = (
        "## Synthetic queries: SciFact without its train labels\n\n"
        f"`bench/synthetic.py`: all-MiniLM-L6-v2, queries for a seeded sample of {settings['documents']} documents "
        f"({settings['llm_documents']} for the LLM) with notebook 01's default filters (round trip top 5; cosine ≥ 0.7 "
        "for the LLM's queries only; the LLM writes at most 64 new tokens), then notebook 03's "
        f"default recipe (max {SEQ} tokens, no mined negatives; without human labels the trained model is merged "
        "half-way back to the base by slerp, `merge_with_base` 0.5), scored on SciFact test. `ndcg@10 as trained`"
        " is the model before that merge.\n\n" + markdown_table(rows, COLUMNS)
    )
    save_results("synthetic", {"settings": settings, "rows": rows}, section)


if __name__ == "__main__":
    main()
