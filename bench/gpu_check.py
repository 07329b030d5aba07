"""GPU check: peak VRAM and tokens/s of one training step for the real Qwen3-Embedding architectures, with random
weights (true speed and memory, nothing to download), and the unsloth path of notebook 03 on the tiny fixture.

For a machine with one NVIDIA GPU and no network (see bench/gpu_check.sh). `--dry-run` checks the configs and
the table code on any machine, without a GPU; `make test` runs it.

    python bench/gpu_check.py [--dry-run] [--sizes 0.6B 4B] [--out docs/benchmarks/gpu_check.md]
"""

from __future__ import annotations

import argparse
import json
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
MODES = ["4-bit QLoRA", "16-bit LoRA", "full fine-tuning"]  # through notebook 03's loader (unsloth on a GPU)
BATCH, SEQ = 32, 512
COLUMNS = ["size", "mode", "loss", "backend", "peak_vram_gb", "tokens_per_s", "status"]


def qwen3_config(size: str):
    from transformers import Qwen3Config

    return Qwen3Config(**ARCHITECTURES[size], max_position_embeddings=32_768, tie_word_embeddings=False)


def approx_params(size: str) -> float:
    a = ARCHITECTURES[size]
    h, kv = a["hidden_size"], a["num_key_value_heads"] * a["head_dim"]
    attn = h * a["num_attention_heads"] * a["head_dim"] * 2 + 2 * h * kv
    return a["vocab_size"] * h + a["num_hidden_layers"] * (attn + 3 * h * a["intermediate_size"])


def write_random_model(size: str, folder: Path) -> Path:
    """A sentence-transformers folder with the architecture, random bf16 weights and the tiny tokenizer (the
    steps below feed random token ids, so the tokenizer only has to load)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Qwen3Model

    from embtune.fixtures import tiny_tokenizer

    torch.manual_seed(0)
    backbone = Qwen3Model(qwen3_config(size)).to(torch.bfloat16)
    hf = folder / "hf"
    backbone.save_pretrained(hf)
    tiny_tokenizer(append_end=True).save_pretrained(hf)
    modules = [Transformer(str(hf), max_seq_length=SEQ), Pooling(backbone.config.hidden_size, "lasttoken"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "st"))
    return folder / "st"


def step(size: str, mode: str, loss_name: str, path: Path) -> dict:
    """One warm-up and three timed training steps at batch 32 x 512 tokens; peak VRAM over all of them."""
    import torch

    from embtune.losses import build_loss
    from embtune.train import TrainConfig, load_for_training

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(
        base_model=str(path), data_dir="", run_dir="", loss=loss_name, max_seq_length=SEQ,
        quant="4bit" if mode == "4-bit QLoRA" else "none", full_finetune=mode == "full fine-tuning",
        gradient_checkpointing=True,
    )  # fmt: skip
    model, backend = load_for_training(config)
    model.cuda().train()
    loss = build_loss(loss_name, model, 0.05, None, 8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = ARCHITECTURES[size]["vocab_size"]

    def features():
        ids = torch.randint(0, vocab, (BATCH, SEQ), device="cuda")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    times = []
    for i in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        value = loss([features(), features()], torch.zeros(BATCH, device="cuda"))
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    tokens = 2 * BATCH * SEQ
    return {"backend": backend.split(" | ")[0], "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "tokens_per_s": round(tokens / (sum(times) / len(times)))}  # fmt: skip


def unsloth_notebook_path(folder: Path) -> str:
    """Notebook 03's path on the tiny fixture: unsloth trains a few steps and merges."""
    from embtune.fixtures import write_tiny_qwen3_embedding
    from embtune.train import TrainConfig, train

    tiny = write_tiny_qwen3_embedding(folder / "tiny")
    log = train(TrainConfig(base_model=str(tiny), data_dir=str(ROOT / "data_samples" / "pydocs"),
                            run_dir=str(folder / "run"), max_steps=5, full_finetune=False))  # fmt: skip
    if not log["backend"].startswith("unsloth") or not (folder / "run" / "model" / "modules.json").exists():
        raise RuntimeError(f"notebook 03 took {log['backend']!r}, or no merged model was written")
    return log["backend"]


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="configs and table only; no GPU needed")
    parser.add_argument("--sizes", nargs="+", default=["0.6B", "4B"], choices=list(ARCHITECTURES))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "gpu_check.md"))
    args = parser.parse_args()
    import torch

    device = "dry run" if args.dry_run else torch.cuda.get_device_name(0)
    rows = []
    for size in args.sizes:
        params = approx_params(size)
        qwen3_config(size)  # the config must build
        with tempfile.TemporaryDirectory() as tmp:
            path = None if args.dry_run else write_random_model(size, Path(tmp))
            for mode in MODES:
                for loss_name in ("qwen3", "cached_qwen3"):
                    row = {"size": f"{size} (~{params / 1e9:.2f}B)", "mode": mode, "loss": loss_name}
                    try:
                        row.update({"status": "dry run"} if args.dry_run else {**step(size, mode, loss_name, path),
                                                                                "status": "ok"})  # fmt: skip
                    except Exception as e:  # one failure (e.g. out of memory) must not hide the other rows
                        row["status"] = f"{type(e).__name__}: {str(e)[:80]}"
                        traceback.print_exc()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if not args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                status = f"ok: {unsloth_notebook_path(Path(tmp))}"
            except Exception as e:
                status = f"{type(e).__name__}: {e}"
        rows.append({"size": "tiny fixture", "mode": "notebook 03 (unsloth path), train + merge", "status": status})
    text = table(rows, f"GPU check on {device}: one training step, batch {BATCH} x {SEQ} tokens, random weights")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
