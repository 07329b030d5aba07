"""Do the exports serve the trained model? all-MiniLM-L6-v2 fine-tuned on SciFact train (`embtune.train` with its
defaults, max 256 tokens, as bench/train_quality.py trains `ours`), exported by `embtune.export` to ONNX
(float32), weight-only int8 ONNX, dynamic int8 ONNX and GGUF (f16, by llama.cpp's converter); each against the
sentence-transformers model: the parity check (`embtune.serving.check`), SciFact test NDCG@10, and CPU encoding
speed of the SciFact corpus as a ratio to sentence-transformers, all in one process, one after another.

The GGUF row needs llama.cpp's converter ($LLAMA_CPP_DIR, else fetched from PyPI's llama-cpp-python source
distribution) and llama-cpp-python to run the file; without either the row says why. GGUF and the served-by-URL
path embed through the client code of SERVING.md (query prompt added, texts clipped to the model's length).

    python bench/export.py [--base | --model DIR] [--keep DIR]   # --base: the stock MiniLM, no training
    python bench/export.py --model RUN/model   # a MiniLM `make run-all` fine-tuned on SciFact (02 + 03 defaults)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, markdown_table, minilm_path, save_results  # noqa: E402

BATCH, SEQ = 32, 256
DATASET = "scifact"


def train_minilm(run_dir: Path) -> Path:
    from embtune.train import TrainConfig, train

    if not (run_dir / "model" / "modules.json").exists():
        train(TrainConfig(base_model=minilm_path(), data_dir=str(SHARED / DATASET), run_dir=str(run_dir),
                          batch_size=BATCH, max_seq_length=SEQ))  # fmt: skip
    return run_dir / "model"


def ndcg(query_emb, doc_emb, data, queries, qrels) -> float:
    from embtune.evaluate import score
    from embtune.search import dense_search

    run = dense_search(query_emb, doc_emb, list(queries), list(data.corpus), k=100)
    return score(qrels, run, ["ndcg@10"])["ndcg@10"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", action="store_true", help="export the stock MiniLM instead of a fine-tuned one")
    parser.add_argument("--model", help="a MiniLM already fine-tuned on SciFact (e.g. RUN/model of make run-all)")
    parser.add_argument("--keep", help="folder to keep the trained model and exports in (default: a temporary one)")
    args = parser.parse_args()

    import numpy as np

    from embtune.data import load_beir
    from embtune.encode import encode, query_prompt
    from embtune.export import ExportConfig, NoGGUF, export_gguf, export_onnx, find_converter, load_onnx, quantize_int8
    from embtune.models import load_embedder
    from embtune.serving import check, clip_texts, gguf_embed

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        start = time.perf_counter()
        model_dir = Path(minilm_path()) if args.base else Path(args.model) if args.model else train_minilm(work / "run")
        train_s = time.perf_counter() - start
        model = load_embedder(str(model_dir), device="cpu")
        out = work / "export"
        export_s = {}
        for fmt, make in (("onnx", lambda: export_onnx(model, model_dir, out / "onnx")),
                          ("onnx-int8", lambda: quantize_int8(out / "onnx", out / "onnx-int8")),
                          ("onnx-int8-dynamic", lambda: quantize_int8(out / "onnx", out / "onnx-int8-dynamic",
                                                                      dynamic=True))):  # fmt: skip
            t = time.perf_counter()
            make()
            export_s[fmt] = round(time.perf_counter() - t, 1)
        gguf, why_not = None, None
        try:
            config = ExportConfig(data_dir="", run_dir=str(work), base_model="", llama_cpp=os.environ.get(
                "LLAMA_CPP_DIR", "pypi"))  # fmt: skip
            t = time.perf_counter()
            gguf = export_gguf(model, model_dir, out / "gguf" / "model-f16.gguf", find_converter(config.llama_cpp))
            export_s["gguf"] = round(time.perf_counter() - t, 1)
            if importlib.util.find_spec("llama_cpp") is None:
                why_not = "llama-cpp-python is not installed (it compiles llama.cpp: ~18 min on two cores)"
        except NoGGUF as e:
            why_not = str(e)

        data = load_beir(SHARED / DATASET, limits="off")
        qrels = data.relevant("test")
        queries = {q: data.queries[q] for q in qrels}
        docs = list(data.doc_texts().values())
        systems = {"sentence-transformers": model, "onnx": load_onnx(out / "onnx"),
                   "onnx-int8": load_onnx(out / "onnx-int8"),
                   "onnx-int8-dynamic": load_onnx(out / "onnx-int8-dynamic")}  # fmt: skip
        rows = []
        for name, system in [*systems.items(), ("gguf", None)]:
            if name == "gguf" and (gguf is None or why_not):
                rows.append({"system": "gguf (f16)", "note": why_not})
                continue
            if name == "gguf":
                embed = gguf_embed(gguf, n_ctx=-(-model.max_seq_length // 256) * 256)
                prompt = query_prompt(model)

                def run(texts, kind, embed=embed, prompt=prompt):  # SERVING.md's client: prompt, clip, batches
                    texts = clip_texts(model.tokenizer, [prompt + t if kind == "query" else t for t in texts], SEQ)
                    vectors = np.concatenate([embed(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])
                    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

                target = str(gguf)
            else:

                def run(texts, kind, system=system):
                    return encode(system, texts, kind, batch_size=BATCH, progress=False)

                target = model if name == "sentence-transformers" else out / name
            run(docs[:64], "document")  # warm-up
            t = time.perf_counter()
            doc_emb = run(docs, "document")
            seconds = time.perf_counter() - t
            score = ndcg(run(list(queries.values()), "query"), doc_emb, data, queries, qrels)
            row = {"system": "gguf (f16)" if name == "gguf" else name, "ndcg@10": round(score, 4),
                   "docs_per_s": round(len(docs) / seconds, 1), "export_s": export_s.get(name, 0.0)}  # fmt: skip
            if name != "sentence-transformers":
                parity = check(model_dir, target, model=model, precision="int8" if "int8" in name else "float")
                row.update(min_cos=parity.min_cosine, median_cos=parity.median_cosine, identical_top10=parity.identical,
                           passed=parity.passed, cause=parity.cause or "")  # fmt: skip
            rows.append(row)
            print(row, flush=True)
        base = next(r for r in rows if r["system"] == "sentence-transformers")
        for r in rows:
            if "docs_per_s" in r:
                r["speed_ratio"] = round(r["docs_per_s"] / base["docs_per_s"], 2)
                r["ndcg_delta"] = round(r["ndcg@10"] - base["ndcg@10"], 4)
    trained = f"all-MiniLM-L6-v2 fine-tuned on SciFact train ({train_s / 60:.0f} min of training)"
    made = "all-MiniLM-L6-v2 fine-tuned on SciFact train by `make run-all` (notebooks 02 and 03, their defaults)"
    what = "all-MiniLM-L6-v2 (stock)" if args.base else made if args.model else trained
    table = markdown_table(rows, ["system", "ndcg@10", "ndcg_delta", "min_cos", "median_cos", "identical_top10",
                                  "passed", "docs_per_s", "speed_ratio", "export_s", "note"])  # fmt: skip
    section = (
        f"## Exports for serving: do they embed what was trained?\n\n`bench/export.py`: {what}, max {SEQ} tokens, "
        f"exported by `embtune.export`; SciFact test NDCG@10 (dense top 100) and CPU encoding speed of the "
        f"{len(docs):,}-document SciFact corpus (batch {BATCH}, one run, one system after another) against "
        "sentence-transformers; the parity check of `embtune.serving` (24 queries with the prompt, 40 documents of "
        "mixed lengths, some over the limit: min / median cosine, share of queries with the identical top 10 of 40, "
        "swaps among near-ties within 1 - threshold of the 10th score aside; passes at min cosine 0.999 float, "
        "0.99 int8, and >= 95 % identical). `onnx-int8` is weight-only "
        "int8 (MatMulNBits, float arithmetic), `onnx-int8-dynamic` sentence-transformers' dynamic-quantisation "
        "recipe (int8 arithmetic); GGUF runs in llama-cpp-python through SERVING.md's client (prompt, clipping)."
        "\n\n" + table
    )
    save_results("export", {"model": what, "max_seq_length": SEQ, "rows": rows}, section)


if __name__ == "__main__":
    main()
