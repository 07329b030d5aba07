"""Peak memory of notebook 03's merge and slerp on a model of Qwen3-Embedding-0.6B's exact architecture (random
bf16 weights, saved as a sentence-transformers folder) with a LoRA adapter of the default rank on every
projection: `merge.merge_adapter` (LoRA into the base) and `merge.slerp_models` (base with the merged model,
t = 0.5), each in its own process, on the CPU. Reported over the process's resident memory just before the step,
against the model's 16-bit size; the goal is below 1.5 x that size (a 4B model then merges in a free Colab).

    python bench/merge_memory.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_own_process, markdown_table, report, save_results  # noqa: E402

QWEN3_06B = dict(num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151_669, max_position_embeddings=32_768)  # fmt: skip


def status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of this process, in MiB. Not getrusage's ru_maxrss, which Linux carries
    over from the parent across exec."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def build(folder: Path) -> int:
    """The base folder and an adapter folder (random non-zero LoRA B); returns the model's 16-bit bytes."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Qwen3Config, Qwen3Model

    from embtune.fixtures import tiny_tokenizer
    from embtune.lora import QWEN_TARGET_MODULES

    torch.manual_seed(0)
    backbone = Qwen3Model(Qwen3Config(**QWEN3_06B)).to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in backbone.parameters())
    backbone.save_pretrained(folder / "hf")
    tiny_tokenizer(append_end=True).save_pretrained(folder / "hf")
    del backbone
    model = SentenceTransformer(modules=[Transformer(str(folder / "hf")), Pooling(1024, "lasttoken"), Normalize()],
                                device="cpu")  # fmt: skip
    model.save(str(folder / "base"))
    model.add_adapter(LoraConfig(r=16, lora_alpha=32, target_modules=QWEN_TARGET_MODULES))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    model.save(str(folder / "adapter"))
    return size


def one(step: str, folder: str) -> dict:
    """One step in this process: its seconds and its peak resident memory over the memory before it."""
    from embtune.merge import merge_adapter, slerp_models

    folder = Path(folder)
    before = status_mb("VmRSS")
    start = time.perf_counter()
    if step == "merge":
        merge_adapter(str(folder / "base"), folder / "adapter", folder / "merged")
    else:
        slerp_models(folder / "base", folder / "merged", 0.5, folder / "slerp")
    peak = status_mb("VmHWM")
    return {"step": step, "seconds": round(time.perf_counter() - start, 1), "rss_before_mb": round(before),
            "peak_over_before_mb": round(peak - before)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=2, metavar=("STEP", "FOLDER"))
    args = parser.parse_args()
    if args.one:
        report(one(*args.one))
        return
    with tempfile.TemporaryDirectory() as tmp:
        size_mb = build(Path(tmp)) / 2**20
        rows = [in_own_process(__file__, step, tmp) for step in ("merge", "slerp")]
    for row in rows:
        row["x_16bit_size"] = round(row["peak_over_before_mb"] / size_mb, 2)
        print(row, flush=True)
    section = (
        "## Merge and slerp memory: Qwen3-Embedding-0.6B architecture\n\n"
        "`bench/merge_memory.py`: random bf16 weights in Qwen3-Embedding-0.6B's architecture "
        f"({size_mb:,.0f} MiB at 16 bits), a rank-16 LoRA on every projection; `merge_adapter` (LoRA into the base) "
        "and `slerp_models` (base with the merged model, t = 0.5), each in its own process on the CPU, reading and "
        "writing one tensor at a time. Peak resident memory over the process's memory just before the step, and as "
        "a multiple of the model's 16-bit size (goal: below 1.5).\n\n"
        + markdown_table(rows, ["step", "seconds", "rss_before_mb", "peak_over_before_mb", "x_16bit_size"])
    )
    save_results("merge_memory", {"model_16bit_mb": round(size_mb), "rows": rows}, section)


if __name__ == "__main__":
    main()
