"""GPU check: what only a CUDA machine can show, in one run (bench/gpu_check.sh sets the machine up; see
docs/BENCHMARKS.md, "Running the GPU check").

Rows, most important first, each in a process of its own (so peak VRAM is that row's alone) and within a time
budget (the rest are skipped with a note when it is spent):
- `env`: importing embtune imports unsloth before transformers; the plan for this card (precision, 4-bit).
- `notebook03`: notebook 03's path on the tiny fixture, as `auto` picks it (unsloth): train, merge on the GPU; the
  merged `model/` read by plain sentence-transformers (another process, no unsloth) equals the trained model;
  unsloth full fine-tuning trains float32 weights with gradient checkpointing; the slerp table's model is on the GPU.
- `parity`: one set of weights (Qwen3-Embedding-0.6B's architecture, random bf16) read by unsloth's
  FastSentenceTransformer and by plain sentence-transformers: cosine of a left-padded, mixed-length batch of
  queries (with the instruction) and documents.
- `train:<size>:<backend>:<mode>:<loss>`: peak VRAM and tokens/s of training steps at batch 32 x 512 with random
  weights of the exact Qwen3-Embedding-0.6B / -4B architectures, in the Trainer's mixed precision, through
  `embtune.train.load_for_training`, and the loss after the steps (same seed for both backends).
- `reranker`: notebook 06's unsloth path (FastLanguageModel) on the tiny fixture, merged equal to the adapter.

    python bench/gpu_check.py [--dry-run] [--out FILE] [--budget SECONDS] [--rows NAME ...]

`--dry-run` runs every row's set-up on the tiny fixture on the CPU (configs, plans, the peft path's first step,
the table); `make test` and `make gpu-rehearsal` run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Qwen3-Embedding-0.6B and -4B (their config.json on the hub), vocabulary as in the tokenizer.
ARCHITECTURES = {
    "0.6B": dict(num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151_669),
    "4B": dict(num_hidden_layers=36, hidden_size=2560, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, vocab_size=151_669),
}  # fmt: skip
BATCH, SEQ, STEPS = 32, 512, 6  # 6 steps: 1 warm-up, 5 timed
TRAIN_ROWS = [  # (size, backend, mode, loss)
    ("0.6B", "unsloth", "4bit", "qwen3"),
    ("0.6B", "peft", "4bit", "qwen3"),
    ("4B", "unsloth", "4bit", "cached_qwen3"),
    ("4B", "peft", "4bit", "cached_qwen3"),
    ("0.6B", "unsloth", "bf16 LoRA", "qwen3"),
    ("0.6B", "peft", "bf16 LoRA", "qwen3"),
    ("0.6B", "unsloth", "full", "qwen3"),
]
ROWS = ["env", "notebook03", "parity", *[":".join(("train", *r)) for r in TRAIN_ROWS], "reranker"]
TEXTS = ["how do I sort a list", "sorted() returns a new sorted list from the items of any iterable, and the "
         "original is left alone; list.sort() sorts in place", "open a file", "x"]  # fmt: skip
COLUMNS = ["row", "backend", "peak_vram_gb", "tokens_per_s", "loss", "result", "seconds"]


def write_random_model(size: str, folder: Path, dry_run: bool) -> Path:
    """A sentence-transformers folder of the architecture with random bf16 weights and the tiny tokenizer
    (training feeds random token ids, so the tokenizer only has to load); the tiny fixture in a dry run."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Qwen3Config, Qwen3Model

    from embtune.encode import WEB_SEARCH_TASK, instruct
    from embtune.fixtures import tiny_tokenizer, write_tiny_qwen3_embedding

    if dry_run:
        return write_tiny_qwen3_embedding(folder / "st")
    torch.manual_seed(0)
    config = Qwen3Config(**ARCHITECTURES[size], max_position_embeddings=32_768, tie_word_embeddings=False)
    with torch.device("cuda"):  # random initialisation of 4B parameters takes minutes on the CPU
        backbone = Qwen3Model(config).to(torch.bfloat16)
    backbone.save_pretrained(folder / "hf")
    tiny_tokenizer(append_end=True).save_pretrained(folder / "hf")
    del backbone
    modules = [Transformer(str(folder / "hf"), max_seq_length=SEQ), Pooling(config.hidden_size, "lasttoken"),
               Normalize()]  # fmt: skip
    SentenceTransformer(modules=modules, prompts={"query": instruct(WEB_SEARCH_TASK), "document": ""},
                        device="cpu").save(str(folder / "st"))  # fmt: skip
    return folder / "st"


def row_env(folder: Path, dry_run: bool) -> dict:
    import torch

    import embtune
    from embtune.lora import LoraOptions, plan

    order = list(sys.modules)  # in import order
    first = "unsloth" in order and order.index("unsloth") < order.index("transformers") if "transformers" in order \
        else "unsloth" in order
    capability = None if dry_run else torch.cuda.get_device_capability(0)
    how = plan(LoraOptions(), "unused", n_params=600_000_000, capability=capability)
    ok = dry_run or (first and how.precision == ("bf16" if capability >= (8, 0) else "fp16") and how.quant == "4bit")
    return {"backend": str(how).split(" | why")[0], "result": f"{'ok' if ok else 'FAILED'}: {embtune.environment()};"
            f" unsloth imported before transformers: {first}"}  # fmt: skip


def embed(model_dir: str, loader: str) -> list:
    """Embeddings of TEXTS (two as queries, with the instruction) by `loader` in this process."""
    from embtune.encode import encode

    if loader == "unsloth":
        from unsloth import FastSentenceTransformer

        model = FastSentenceTransformer.from_pretrained(model_dir, for_inference=True)
    else:
        from embtune.models import load_embedder

        model = load_embedder(model_dir)
    return [*encode(model, TEXTS[:2], "query").tolist(), *encode(model, TEXTS, "document", batch_size=4).tolist()]


def plain_embeddings(model_dir: str, dry_run: bool) -> list:
    """Plain sentence-transformers' embeddings, from a process that never imports unsloth (this one in a dry run)."""
    if dry_run:
        return embed(model_dir, "plain")
    script = f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import gpu_check; " \
             f"print('EMB ' + json.dumps(gpu_check.embed({model_dir!r}, 'plain')))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "EMBTUNE_UNSLOTH": "0"}).stdout  # fmt: skip
    return json.loads(out.rsplit("EMB ", 1)[1])


def cosines(a: list, b: list) -> list[float]:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).tolist()


def row_parity(folder: Path, dry_run: bool) -> dict:
    model = write_random_model("0.6B", folder, dry_run)
    if dry_run:
        return {"result": f"dry run: plain embeddings {len(plain_embeddings(str(model), dry_run))} rows"}
    low = min(cosines(embed(str(model), "unsloth"), plain_embeddings(str(model), dry_run)))
    return {"result": f"{'ok' if low >= 0.999 else 'FAILED'}: min cosine {low:.5f} (goal >= 0.999)"}


def row_notebook03(folder: Path, dry_run: bool) -> dict:
    import torch

    from embtune.encode import encode
    from embtune.fixtures import write_tiny_qwen3_embedding
    from embtune.merge import slerp_models
    from embtune.models import load_embedder
    from embtune.train import TrainConfig, build_trainer, load_for_training, save_outputs

    tiny = write_tiny_qwen3_embedding(folder / "tiny")
    # merge_with_base=1: the dev slerp grid scores with ranx, which the kit does not carry (its numba and llvmlite
    # alone exceed the kit's budget); the grid runs on the CPU in make test, the GPU-only parts are all here
    common = dict(base_model=str(tiny), data_dir=str(ROOT / "data_samples" / "pydocs"), max_steps=5,
                  eval_steps=5, batch_size=8, max_seq_length=64, merge_with_base=1.0)  # fmt: skip
    config = TrainConfig(run_dir=str(folder / "run"), full_finetune=False, **common)
    training = build_trainer(config)
    start = time.perf_counter()
    training.trainer.train()
    log = save_outputs(training, time.perf_counter() - start)
    model = training.trainer.model  # the best checkpoint, as merged
    trained = [*encode(model, TEXTS[:2], "query").tolist(), *encode(model, TEXTS, "document", batch_size=4).tolist()]
    # finetuned/ is the merged model as trained (model/ is its slerp with the base at the t dev chose)
    low = min(cosines(trained, plain_embeddings(log["finetuned_model"], dry_run)))
    checks = {"unsloth backend": log["backend"].startswith("unsloth") or dry_run, "merged = trained": low >= 0.999}
    _, full = load_for_training(TrainConfig(run_dir="unused", full_finetune=True, gradient_checkpointing=True,
                                            **common))  # fmt: skip
    checks["full: fp32 weights, checkpointing on"] = full.trainable_dtype == "float32" and full.gradient_checkpointing
    slerped = load_embedder(str(slerp_models(tiny, log["finetuned_model"], 0.5, folder / "slerp")))
    checks["slerp scored on the GPU"] = slerped.device.type == ("cpu" if dry_run else "cuda")
    failed = [name for name, ok in checks.items() if not ok]
    return {"backend": log["backend"].split(" | why")[0], "peak_vram_gb": _peak_gb(torch),
            "result": ("FAILED: " + ", ".join(failed) if failed else "ok") + f" (min cosine {low:.5f}; full: {full})"}


def _peak_gb(torch) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None


def row_train(size: str, backend: str, mode: str, loss_name: str, folder: Path, dry_run: bool) -> dict:
    """Training steps at batch 32 x 512 through notebook 03's loader, with the Trainer's mixed precision."""
    import torch
    from transformers import set_seed

    from embtune.losses import build_loss
    from embtune.train import TrainConfig, load_for_training

    model_dir = write_random_model(size, folder, dry_run)
    batch, seq, steps = (4, 16, 2) if dry_run else (BATCH, SEQ, STEPS)
    set_seed(42)
    config = TrainConfig(base_model=str(model_dir), data_dir="unused", run_dir="unused", loss=loss_name,
                         max_seq_length=seq, backend="peft" if dry_run else backend, mini_batch_size=8,
                         quant="none" if mode != "4bit" or dry_run else "4bit", full_finetune=mode == "full",
                         gradient_checkpointing=True)  # fmt: skip
    model, how = load_for_training(config)
    device = "cpu" if dry_run else "cuda"
    if next(model.parameters()).device.type != device:  # 4-bit weights are placed by the loader
        model.to(device)
    model.train()
    loss = build_loss(loss_name, model, config.temperature, None, config.mini_batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model[0].auto_model.config.vocab_size

    def features():
        ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    times, value = [], None
    for step in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=how.precision == "bf16"):
            value = loss([features(), features()], torch.zeros(batch, device=device))
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return {"backend": str(how).split(" | why")[0], "peak_vram_gb": _peak_gb(torch),
            "tokens_per_s": round(2 * batch * seq / (sorted(times)[len(times) // 2])), "loss": round(value.item(), 4),
            "result": "dry run" if dry_run else "ok"}  # fmt: skip


def row_reranker(folder: Path, dry_run: bool) -> dict:
    import numpy as np

    from embtune.fixtures import write_tiny_qwen3_reranker
    from embtune.mine import save
    from embtune.rerank import load_reranker
    from embtune.rerank_train import RerankConfig, train_reranker
    from embtune.rundir import data_fingerprint, make_manifest

    tiny = write_tiny_qwen3_reranker(folder / "tiny")
    docs = [TEXTS[1], "a file object is returned by open()", "nothing to see", "unrelated text"]
    data, run = folder / "data", folder / "run"
    (data / "qrels").mkdir(parents=True)
    def jsonl(path, records):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    jsonl(data / "corpus.jsonl", [{"_id": f"d{i}", "text": d} for i, d in enumerate(docs)])
    jsonl(data / "queries.jsonl", [{"_id": f"q{i}", "text": TEXTS[0]} for i in range(4)])
    qrels = "".join(f"q{i}\td0\t1\n" for i in range(4))
    (data / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    negatives = {"positive_id": "d0", "positive": docs[0], "negative_ids": ["d1", "d2"], "negatives": docs[1:3],
                 "positive_score": 0.5, "negative_scores": [0.1, 0.1]}  # fmt: skip
    rows = [{"query_id": f"q{i}", "query": TEXTS[0], **negatives} for i in range(4)]
    save(rows, {"made_from": make_manifest({"data": data_fingerprint(data)}, {})}, run)  # as notebook 02 saves
    log = train_reranker(RerankConfig(reranker_model=str(tiny), base_model=str(tiny), data_dir=str(data),
                                      run_dir=str(run), backend="peft" if dry_run else "auto", full_finetune=False,
                                      max_steps=4, batch_size=4))  # fmt: skip
    pairs = [(TEXTS[0], d) for d in docs]
    merged = load_reranker(str(run / "reranker" / "model")).predict(pairs)
    adapter = load_reranker(str(run / "reranker" / "adapter")).predict(pairs)
    gap = float(np.abs(np.asarray(merged) - np.asarray(adapter)).max())
    unsloth = "unsloth" in log["backend"] or dry_run
    return {"backend": log["backend"].split(" | why")[0],
            "result": f"{'ok' if unsloth and gap < 1e-2 else 'FAILED'}: merged - adapter {gap:.1e}"}  # fmt: skip


def run_row(name: str, dry_run: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("train:"):
            return row_train(*name.split(":")[1:], Path(tmp), dry_run)
        return {"env": row_env, "notebook03": row_notebook03, "parity": row_parity, "reranker": row_reranker}[name](
            Path(tmp), dry_run)  # fmt: skip


def in_process(name: str, dry_run: bool, budget: float) -> dict:
    """One row in a fresh interpreter, killed at `budget` seconds; in a dry run, in this one (no VRAM to keep
    apart, and no unsloth to keep out)."""
    if dry_run:
        start = time.perf_counter()
        try:
            row = run_row(name, dry_run)
        except Exception as e:
            traceback.print_exc()
            row = {"result": f"FAILED: {type(e).__name__}: {e}"}
        return {"row": name, **row, "seconds": round(time.perf_counter() - start)}
    args = [sys.executable, __file__, "--row", name] + (["--dry-run"] if dry_run else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"row": name, "result": f"stopped after {budget:.0f} s"}
    sys.stderr.write(done.stderr[-4000:])
    seconds = round(time.perf_counter() - start)
    if "ROW " not in done.stdout:
        return {"row": name, "result": f"FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}",
                "seconds": seconds}  # fmt: skip
    return {"row": name, **json.loads(done.stdout.rsplit("ROW ", 1)[1]), "seconds": seconds}


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |"
              for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="every row's set-up on the tiny fixture, on the CPU")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--budget", type=float, default=420, help="seconds for all rows (8-minute call, margin)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", ROOT / "build"), "gpu_check.md"))
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        try:
            print("ROW " + json.dumps(run_row(args.row, args.dry_run)), flush=True)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    import torch

    device = "dry run (CPU, tiny fixture)" if args.dry_run else torch.cuda.get_device_name(0)
    deadline = time.perf_counter() + args.budget
    rows = []
    for name in args.rows:
        left = deadline - time.perf_counter()
        skipped = {"row": name, "result": "skipped: budget spent"}
        rows.append(in_process(name, args.dry_run, left) if left > 20 else skipped)
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, f"GPU check on {device}: training at batch {BATCH} x {SEQ} tokens, random weights")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
