"""Do the exports serve the trained model? Two fine-tuned embedders, each exported by `embtune.export` to ONNX
(float32), weight-only int8 ONNX, dynamic int8 ONNX and GGUF (f16, by llama.cpp's converter), each export read the
way SERVING.md serves it, against plain sentence-transformers:

- `minilm`: all-MiniLM-L6-v2 (mean pooling, no prompt) fine-tuned on SciFact train by `embtune.train` (defaults);
- `smollm2`: SmolLM2-135M-Instruct made a Qwen3-style embedder by `embtune.decoder.embedder_from_causal_lm` (last
  token, left padding, an appended end token, the query instruction) and fine-tuned by notebook 03's
  `embtune.train` for a short run (LoRA, merged): the Qwen3 specifics on real weights.

For each export: the parity check (`embtune.serving.check`: plain sentence-transformers in its own process against
the ONNX consumer client / llama-server), SciFact test NDCG@10 and its difference from sentence-transformers, and
CPU encoding speed of the SciFact corpus as a ratio to sentence-transformers, all in one process, one system after
another. ONNX is read by `embtune.consumer.OnnxEmbedder` (SERVING.md's client); GGUF by llama-server started with
SERVING.md's command, queried by SERVING.md's HTTP client (prompt, clipping, batches of 32).

    python bench/export.py [--models minilm smollm2] [--work DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, markdown_table, minilm_path, save_results, saved, smollm2_gguf  # noqa: E402

BATCH, SEQ = 32, 256
DATASET = "scifact"
LABELS = {"minilm": "all-MiniLM-L6-v2 fine-tuned on SciFact train (embtune.train defaults)",
          "smollm2": "SmolLM2-135M-Instruct as a last-token embedder, LoRA fine-tuned on SciFact train"}  # fmt: skip


def trained(name: str, work: Path, steps: int) -> Path:
    """The fine-tuned model folder, trained once into `work`."""
    from embtune.train import TrainConfig, train

    run_dir = work / f"run-{name}"
    if (run_dir / "model" / "modules.json").exists():
        return run_dir / "model"
    if name == "minilm":
        config = TrainConfig(base_model=minilm_path(), data_dir=str(SHARED / DATASET), run_dir=str(run_dir),
                             batch_size=BATCH, max_seq_length=SEQ)  # fmt: skip
    else:
        import torch

        from embtune.decoder import embedder_from_causal_lm

        base = work / "smollm2-135m-embedder"
        if not (base / "modules.json").exists():
            embedder_from_causal_lm(smollm2_gguf().parent, base, gguf_file=smollm2_gguf().name, dtype=torch.bfloat16)
        config = TrainConfig(base_model=str(base), data_dir=str(SHARED / DATASET), run_dir=str(run_dir),
                             batch_size=BATCH, max_seq_length=SEQ, max_steps=steps, eval_steps=steps,
                             eval_corpus_size=1000, full_finetune=False, merge_with_base=1.0)  # fmt: skip
    train(config)
    return run_dir / "model"


def ndcg(query_emb, doc_emb, ids, doc_ids, qrels) -> float:
    from embtune.evaluate import score
    from embtune.search import dense_search

    run = dense_search(query_emb, doc_emb, ids, doc_ids, k=100)
    return score(qrels, run, ["ndcg@10"])["ndcg@10"]


def corpus(data, qrels, size: int, seed: int = 0) -> list[str]:
    """The document ids scored: all of them (`size` 0), or every document relevant to a test query and a seeded
    sample of the others up to `size` (the same for every system, so their differences stand)."""
    import random

    ids = list(data.corpus)
    if not size or size >= len(ids):
        return ids
    relevant = {d for docs in qrels.values() for d in docs}
    others = [d for d in ids if d not in relevant]
    return sorted(relevant) + random.Random(seed).sample(others, max(0, size - len(relevant)))


def bench_model(name: str, work: Path, steps: int, size: int) -> list[dict]:
    import numpy as np

    from embtune import consumer, llama_cpp
    from embtune.data import load_beir
    from embtune.encode import query_prompt
    from embtune.export import export_gguf, export_onnx, find_converter, quantize_int8
    from embtune.models import load_embedder
    from embtune.serving import check, llama_pooling

    model_dir = trained(name, work, steps)
    model = load_embedder(str(model_dir), device="cpu")
    out = work / f"export-{name}"
    export_s = {}
    for fmt, make in (("onnx", lambda: export_onnx(model, model_dir, out / "onnx")),
                      ("onnx-int8", lambda: quantize_int8(out / "onnx", out / "onnx-int8")),
                      ("onnx-int8-dynamic", lambda: quantize_int8(out / "onnx", out / "onnx-int8-dynamic", True)),
                      ("gguf (f16)", lambda: export_gguf(model, model_dir, out / "gguf" / "model-f16.gguf",
                                                         find_converter("pypi")))):  # fmt: skip
        t = time.perf_counter()
        make()
        export_s[fmt] = round(time.perf_counter() - t, 1)

    data = load_beir(SHARED / DATASET, limits="off")
    qrels = data.relevant("test")
    ids = list(qrels)
    queries = [data.queries[q] for q in ids]
    doc_ids = corpus(data, qrels, size)
    texts = data.doc_texts()
    docs = [texts[d] for d in doc_ids]
    prompt = query_prompt(model)
    clip = consumer.clipper(model_dir)

    def plain(texts, kind):  # what a sentence-transformers user gets
        return model.encode_query(texts, batch_size=BATCH) if kind == "query" else model.encode_document(
            texts, batch_size=BATCH)  # fmt: skip

    def onnx(folder):
        embedder = consumer.OnnxEmbedder(folder)
        return lambda texts, kind: embedder.embed([prompt + t for t in texts] if kind == "query" else texts)

    rows = []
    systems = [("sentence-transformers", None, plain)]
    systems += [(fmt, out / fmt, onnx(out / fmt)) for fmt in ("onnx", "onnx-int8", "onnx-int8-dynamic")]
    gguf = out / "gguf" / "model-f16.gguf"
    with llama_cpp.serve(llama_cpp.find_server("build"), gguf, length=llama_cpp.embedding_context(SEQ),
                         pooling=llama_pooling(model)) as url:  # fmt: skip

        def served(texts, kind):  # SERVING.md's HTTP client: the prompt, texts clipped, batches of 32
            return consumer.http_embed(url + "/v1", [clip(prompt + t if kind == "query" else t) for t in texts])

        systems.append(("gguf (f16)", gguf, served))
        for system, target, run in systems:
            run(docs[:64], "document")  # warm-up
            t = time.perf_counter()
            doc_emb = np.asarray(run(docs, "document"), dtype=np.float32)
            seconds = time.perf_counter() - t
            score = ndcg(np.asarray(run(queries, "query"), dtype=np.float32), doc_emb, ids, doc_ids, qrels)
            row = {"model": name, "system": system, "documents": len(docs), "ndcg@10": round(score, 4),
                   "docs_per_s": round(len(docs) / seconds, 1), "export_s": export_s.get(system, 0.0)}  # fmt: skip
            if target is not None:
                parity = check(model_dir, target, model=model, precision="int8" if "int8" in system else "float")
                row.update(min_cos=parity.min_cosine, median_cos=parity.median_cosine,
                           identical_top10=parity.identical, passed=parity.passed,
                           cause=parity.cause or parity.error or "")  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    base = rows[0]
    for r in rows:
        r["speed_ratio"] = round(r["docs_per_s"] / base["docs_per_s"], 2)
        r["ndcg_delta"] = round(r["ndcg@10"] - base["ndcg@10"], 4)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=list(LABELS))
    parser.add_argument("--work", default="/tmp/embtune-bench-export", help="where models and exports are kept")
    parser.add_argument("--steps", type=int, default=30, help="SmolLM2's optimiser steps (a short run suffices)")
    parser.add_argument("--documents", type=int, default=0, help="score on the test positives and a sample of "
                        "the others up to this many documents (0: the whole corpus)")  # fmt: skip
    args = parser.parse_args()
    work = Path(args.work)
    rows = [r for name in args.models for r in bench_model(name, work, args.steps, args.documents)]
    kept = saved("export") or {}  # the other models' rows stay: each model can be rerun alone
    write([r for r in kept.get("rows", []) if r.get("model", args.models[0]) not in args.models] + rows, args.steps)


FOUND = (
    "Found by this benchmark on SmolLM2, and fixed: sentence-transformers 6 rendered every plain text of a chat "
    "model through its chat template (the `message` modality), which no server applies: ONNX min cosine 0.676, "
    "the check naming the cause (`embtune.decoder.embedder_from_causal_lm` now drops the chat template); and "
    "llama-server answered HTTP 500 `unordered_map::at` on its GGUF: transformers writes a tokenizer read from a "
    "GGUF file as a byte-level BPE flagged `byte_fallback`, which llama.cpp's converter took for a SentencePiece "
    "vocabulary (the export's staged tokenizer drops the needless flag, `embtune.llama_cpp.stage_tokenizer`)."
)


def write(rows: list[dict], steps: int, note: str = "") -> None:
    """The results file and docs/BENCHMARKS.md's section, from every model's rows; `note` goes under the table."""
    models = sorted({r["model"] for r in rows}, key=list(LABELS).index)
    columns = ["model", "system", "documents", "ndcg@10", "ndcg_delta", "min_cos", "median_cos", "identical_top10",
               "passed", "docs_per_s", "speed_ratio", "export_s", "cause"]  # fmt: skip
    table = markdown_table(rows, columns)
    described = "; ".join(f"`{m}`: {LABELS[m]}" + (f" ({steps} steps)" if m == "smollm2" else "")
                          for m in models)  # fmt: skip
    section = (
        "## Exports for serving: do they embed what was trained?\n\n"
        f"`bench/export.py`: {described}; max {SEQ} tokens, exported by `embtune.export`. Each export is read the way "
        "SERVING.md serves it: ONNX by the consumer client (`embtune.consumer.OnnxEmbedder`: tokenizers + "
        "onnxruntime + the folder's pooling), GGUF by `llama-server` with SERVING.md's command through its HTTP "
        "client (prompt, clipping, batches of 32). SciFact test NDCG@10 (dense top 100) and CPU encoding speed of "
        "the SciFact corpus or, where `documents` says so, of its test positives and a seeded sample of the others "
        "(one run, one system after another) against plain sentence-transformers; the parity "
        "check of `embtune.serving` (plain sentence-transformers in its own process as the reference; 24 queries "
        "with the prompt, 40 documents of mixed lengths, some over the limit: min / median cosine, share of queries "
        "with the identical top 10 of 40, swaps among near-ties aside; passes at min cosine 0.999 float, 0.99 int8, "
        ">= 95 % identical). `onnx-int8` is weight-only int8 (MatMulNBits, float arithmetic), `onnx-int8-dynamic` "
        "sentence-transformers' dynamic-quantisation recipe (int8 arithmetic).\n\n" + table
        + ("\n\n" + FOUND if "smollm2" in models else "") + (f"\n\n{note}" if note else "")
    )
    save_results("export", {"models": {m: LABELS[m] for m in models}, "max_seq_length": SEQ,
                            "smollm2_steps": steps, "rows": rows, "note": note}, section)  # fmt: skip


if __name__ == "__main__":
    main()
