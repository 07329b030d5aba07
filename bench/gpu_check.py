"""GPU check: what only a CUDA machine can show, in one run (bench/gpu_check.sh sets the machine up; see
docs/BENCHMARKS.md, "Running the GPU check").

Rows, most important first, each in a process of its own (so peak VRAM is that row's alone) and within a time
budget (the rest are skipped with a note when it is spent). Each says "ok", or "FAILED:" and what differs:
- `env`: importing embtune imports unsloth before transformers; the plan for this card (precision, 4-bit).
- `parity:embedder`, `parity:reranker`: unsloth's training forward and backward against peft's, each in its own
  process (the peft one never imports unsloth), through notebook 03's / 06's loader on one NF4 base
  (Qwen3-0.6B's architecture, random bf16 weights), the same LoRA A and B in both (B small and random: with B = 0
  A's gradient is 0), dropout 0, on left-padded mixed-length real text (pydocs, queries with the instruction):
  step-0 loss within 1 % and the LoRA gradients at cosine >= 0.99.
- `notebook03`: notebook 03's path on the tiny fixture as `auto` picks it (unsloth): `finetuned/` read by plain
  sentence-transformers equals the adapter on the unquantised base read by plain peft (another process, no
  unsloth) at cosine >= 0.999; the NF4 model's cosine to it reported as a number; `adapter/` equals the
  checkpoint the run chose; unsloth full fine-tuning trains float32 weights with gradient checkpointing.
- `reranker`: notebook 06's unsloth path (FastLanguageModel) on the tiny fixture, merged equal to the adapter.
- `t4:0.6B`, `t4:4B`: a T4 on any GPU: capability 7.5 (fp16 weights, GradScaler) and memory capped at 15 GB
  (`torch.cuda.set_per_process_memory_fraction`); Qwen3-0.6B's architecture through notebook 03's `train`, and
  Qwen3-4B's QLoRA with the memory plan through the merge, then one 16-bit slerp candidate encoding (the phase
  `merge_with_base="auto"` adds).
- `train:<size>:<backend>:<mode>:<loss>`: peak VRAM and tokens/s of training steps at batch 32 x 512 with random
  weights of the exact Qwen3-Embedding-0.6B / -4B architectures, in the Trainer's mixed precision, through
  `embtune.train.load_for_training`, and the loss after the steps (same seed for both backends).

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
ROWS = ["env", "parity:embedder", "parity:reranker", "notebook03", "reranker", "t4:0.6B", "t4:4B",
        *[":".join(("train", *r)) for r in TRAIN_ROWS]]
T4_BYTES = 15e9  # a free Colab T4's memory
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


def embed(model_dir: str, loader: str, adapter: str | None = None) -> list:
    """Embeddings of TEXTS (two as queries, with the instruction) in this process: "plain" reads `model_dir` with
    sentence-transformers; "peft" and "peft-nf4" put `adapter` on it with plain peft, on the unquantised base or
    on its NF4 quantisation."""
    from embtune.encode import encode
    from embtune.models import load_embedder

    kwargs = {}
    if loader == "peft-nf4":
        import torch
        from transformers import BitsAndBytesConfig

        kwargs = {"model_kwargs": {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)}}  # fmt: skip
    model = load_embedder(model_dir, **kwargs)
    if adapter:  # transformers' peft integration: the model keeps its class, so sentence-transformers' forward
        model[0].model.load_adapter(adapter)  # passes it every input (a PeftModel wrapper would lose the mask)
    return [*encode(model, TEXTS[:2], "query").tolist(), *encode(model, TEXTS, "document", batch_size=4).tolist()]


def elsewhere(function: str, *args, dry_run: bool = False):
    """gpu_check.<function>(*args) in a fresh interpreter that never imports unsloth (in this one in a dry run,
    which has none); its result passes as JSON."""
    if dry_run:
        return globals()[function](*args)
    script = f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import gpu_check; " \
             f"print('OUT ' + json.dumps(gpu_check.{function}(*{list(args)!r})))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "EMBTUNE_UNSLOTH": "0"}).stdout  # fmt: skip
    return json.loads(out.rsplit("OUT ", 1)[1])


def cosines(a: list, b: list) -> list[float]:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).tolist()


def parity_batch(n: int = 8) -> tuple[list[str], list[str]]:
    """n pydocs queries and their labelled documents: real text of mixed lengths."""
    from embtune.data import load_beir

    data = load_beir(ROOT / "data_samples" / "pydocs")
    docs = data.doc_texts()
    pairs = sorted((q, next(iter(d))) for q, d in data.relevant("train").items())[:n]
    return [data.queries[q] for q, _ in pairs], [docs[d] for _, d in pairs]


def lora_name(name: str) -> str:
    """A LoRA parameter's name without the wrappers' prefixes, alike in unsloth's and peft's models."""
    return name[name.index("layers."):].replace(".default", "")


def lora_step(kind: str, model_dir: str, backend: str, lora_file: str) -> dict:
    """One training-mode forward and backward of notebook 03's (kind "embedder") or 06's ("reranker") loader
    with `backend`, 4-bit, dropout 0, in the plan's mixed precision. The LoRA weights come from `lora_file` when
    it exists; else they are drawn (B small and random) and saved there. Returns the loss and the LoRA
    gradients by name."""
    import torch
    from safetensors.torch import load_file, save_file

    from embtune.encode import WEB_SEARCH_TASK, instruct

    queries, docs = parity_batch()
    if kind == "embedder":
        from embtune.losses import build_loss
        from embtune.train import TrainConfig, load_for_training

        config = TrainConfig(base_model=model_dir, data_dir="unused", run_dir="unused", backend=backend,
                             quant="4bit", full_finetune=False, lora_dropout=0.0, gradient_checkpointing=False,
                             max_seq_length=256)  # fmt: skip
        model, how = load_for_training(config)
        loss_fn = build_loss("qwen3", model, config.temperature, None, None)

        def loss():
            features = [model.preprocess(queries, prompt=instruct(WEB_SEARCH_TASK)), model.preprocess(docs)]
            features = [{k: v.to(model.device) if hasattr(v, "to") else v for k, v in f.items()} for f in features]
            return loss_fn(features, torch.zeros(len(queries), device=model.device))
    else:
        from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

        from embtune.rerank_train import RerankConfig, load_for_training

        config = RerankConfig(reranker_model=model_dir, base_model=model_dir, data_dir="unused", run_dir="unused",
                              backend=backend, quant="4bit", full_finetune=False, lora_dropout=0.0,
                              gradient_checkpointing=False, max_length=256)  # fmt: skip
        model, how = load_for_training(config)
        loss_fn = BinaryCrossEntropyLoss(model)
        pairs = [queries + queries, docs + docs[1:] + docs[:1]]  # each query with its document, then another's

        def loss():
            return loss_fn(pairs, torch.tensor([1.0] * len(queries) + [0.0] * len(queries), device=model.device))
    model.train()
    params = {lora_name(n): p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        if Path(lora_file).exists():
            saved = load_file(lora_file)
            if saved.keys() != params.keys():
                raise RuntimeError(f"LoRA parameters differ: {sorted(saved.keys() ^ params.keys())[:4]}")
            for n, p in params.items():
                p.copy_(saved[n])
        else:
            generator = torch.Generator().manual_seed(0)
            for n, p in sorted(params.items()):
                if "lora_B" in n:  # peft's B starts at 0, which would leave A's gradient at 0
                    p.copy_(0.01 * torch.randn(p.shape, generator=generator))
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, lora_file)
    device = model.device.type
    with torch.autocast(device, dtype=torch.bfloat16 if how.precision == "bf16" else torch.float16,
                        enabled=how.precision != "fp32"):  # fmt: skip
        value = loss()
    value.backward()
    return {"loss": value.item(), "backend": str(how).split(" | why")[0],
            "grads": {n: p.grad.float().flatten().tolist() for n, p in sorted(params.items())}}


def row_parity(kind: str, folder: Path, dry_run: bool) -> dict:
    from embtune.fixtures import write_tiny_qwen3_reranker

    if kind == "embedder":
        model = str(write_random_model("0.6B", folder, dry_run))
    else:
        model = str(write_tiny_qwen3_reranker(folder / "reranker") if dry_run else write_random_lm(folder))
    lora = str(folder / "lora.safetensors")
    fast = lora_step(kind, model, "peft" if dry_run else "unsloth", lora)
    plain = elsewhere("lora_step", kind, model, "peft", lora, dry_run=dry_run)
    failed, gap, cos = compare_steps(fast, plain)
    return {"backend": f"{fast['backend']} vs {plain['backend']}", "loss": round(fast["loss"], 5),
            "result": ("FAILED: " + ", ".join(failed) if failed else "ok")
            + f" (loss gap {gap:.2%}, goal <= 1 %; gradient cosine {cos:.5f}, goal >= 0.99)"}  # fmt: skip


def compare_steps(fast: dict, plain: dict) -> tuple[list[str], float, float]:
    """(what differs, the relative loss gap, the cosine of all LoRA gradients) of two `lora_step` results."""
    import numpy as np

    gap = abs(fast["loss"] - plain["loss"]) / abs(plain["loss"])
    flat = [np.concatenate([np.asarray(g[n]) for n in sorted(g)]) for g in (fast["grads"], plain["grads"])]
    cos = float(flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1]) + 1e-30))
    failed = [what for what, bad in [(f"loss {fast['loss']:.5f} vs peft's {plain['loss']:.5f}", gap > 0.01),
                                     (f"LoRA gradients at cosine {cos:.4f}", cos < 0.99)] if bad]  # fmt: skip
    return failed, gap, cos


def write_random_lm(folder: Path) -> Path:
    """Qwen3-0.6B's architecture as a causal LM (random bf16 weights) with the tiny reranker's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from embtune.fixtures import write_tiny_qwen3_reranker

    tiny = write_tiny_qwen3_reranker(folder / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    torch.manual_seed(0)
    config = Qwen3Config(**{**ARCHITECTURES["0.6B"], "vocab_size": len(tokenizer)}, max_position_embeddings=32_768,
                         tie_word_embeddings=True)  # fmt: skip
    with torch.device("cuda"):
        lm = Qwen3ForCausalLM(config).to(torch.bfloat16)
    lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    return folder / "lm"


def chosen_checkpoint_matches(run: Path, log: dict) -> bool:
    """adapter/ holds exactly the tensors of the checkpoint the run chose (the end: the last one)."""
    import torch
    from safetensors.torch import load_file

    from embtune.rundir import last_complete_checkpoint

    checkpoints = run / "checkpoints"
    chosen = last_complete_checkpoint(checkpoints) if log["checkpoint"] == "end" else \
        checkpoints / f"checkpoint-{log['checkpoint'].split()[1]}"  # fmt: skip
    shipped, kept = (load_file(f / "adapter_model.safetensors") for f in (run / "adapter", Path(chosen)))
    return shipped.keys() == kept.keys() and all(torch.equal(shipped[k], kept[k]) for k in kept)


def against_the_adapter(base: str, adapter: Path, merged: str, dry_run: bool) -> tuple[float, float]:
    """The lowest cosine of `merged` (read by plain sentence-transformers) to the adapter on the unquantised base
    (plain peft), and of the adapter on the NF4 base to that same reference; in a process without unsloth."""
    reference, target, nf4 = elsewhere("embed_each", [[base, "peft", str(adapter)], [merged, "plain"],
                                                      [base, "peft-nf4", str(adapter)]], dry_run=dry_run)  # fmt: skip
    return min(cosines(target, reference)), min(cosines(nf4, reference))


def embed_each(calls: list[list]) -> list[list]:
    """`embed(*call)` for each call, in one process (one interpreter start for several models)."""
    return [embed(*call) for call in calls]


def restores_exactly(model, checkpoint: Path) -> bool:
    """`train.restore_checkpoint` into `model` leaves its LoRA tensors equal to the checkpoint's."""
    import torch
    from safetensors.torch import load_file

    from embtune.train import restore_checkpoint

    restore_checkpoint(model, checkpoint)
    saved = {lora_name(k): v for k, v in load_file(checkpoint / "adapter_model.safetensors").items()}
    now = {lora_name(n): p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n}
    return now.keys() == saved.keys() and all(torch.equal(now[k].to(saved[k].dtype), saved[k]) for k in saved)


def row_notebook03(folder: Path, dry_run: bool) -> dict:
    import torch

    from embtune.fixtures import write_tiny_qwen3_embedding
    from embtune.merge import slerp_models
    from embtune.models import load_embedder
    from embtune.train import TrainConfig, load_for_training, train

    tiny = str(write_tiny_qwen3_embedding(folder / "tiny"))
    # merge_with_base=1: the dev slerp grid scores with ranx, which the kit does not carry (its numba and llvmlite
    # alone exceed the kit's budget); the grid runs on the CPU in make test, its memory in the t4 rows
    # max_seq_length above TEXTS' lengths: finetuned/ keeps training's cap, the base its own
    # one checkpoint (eval_steps = max_steps): choosing between two scores dev with faiss and ranx, not in the kit;
    # restoring a checkpoint into unsloth's 4-bit model, what that choice does, is checked below
    common = dict(base_model=tiny, data_dir=str(ROOT / "data_samples" / "pydocs"), max_steps=6, eval_steps=6,
                  batch_size=8, max_seq_length=256, merge_with_base=1.0, merge_dtype="float32")  # fmt: skip
    run = folder / "run"
    log = train(TrainConfig(run_dir=str(run), full_finetune=False, **common))
    # the reference: the adapter on the unquantised base, by plain peft; the target: finetuned/ by plain
    # sentence-transformers; each in a process without unsloth
    low, low_nf4 = against_the_adapter(tiny, run / "adapter", log["finetuned_model"], dry_run)
    checks = {"unsloth backend": log["backend"].startswith("unsloth") or dry_run,
              f"finetuned/ = adapter on the base (min cosine {low:.5f}, goal >= 0.999)": low >= 0.999,
              f"adapter/ = the chosen checkpoint ({log['checkpoint']})": chosen_checkpoint_matches(run, log)}
    fresh, _ = load_for_training(TrainConfig(run_dir="unused", full_finetune=False, quant="4bit", **common))
    checks["a checkpoint restores into a fresh 4-bit model exactly"] = restores_exactly(fresh, run / "checkpoints"
                                                                                        / "checkpoint-6")  # fmt: skip
    del fresh
    _, full = load_for_training(TrainConfig(run_dir="unused", full_finetune=True, gradient_checkpointing=True,
                                            **common))  # fmt: skip
    checks["full: fp32 weights, checkpointing on"] = full.trainable_dtype == "float32" and full.gradient_checkpointing
    slerped = load_embedder(str(slerp_models(tiny, log["finetuned_model"], 0.5, folder / "slerp")))
    checks["slerp scored on the GPU"] = slerped.device.type == ("cpu" if dry_run else "cuda")
    failed = [name for name, ok in checks.items() if not ok]
    return {"backend": log["backend"].split(" | why")[0], "peak_vram_gb": _peak_gb(torch),
            "result": ("FAILED: " + "; ".join(failed) if failed else "ok") + f" (min cosine {low:.5f}; NF4 model "
            f"to the reference: {low_nf4:.5f}, reported; checkpoint: {log['checkpoint']}; full: {full})"}  # fmt: skip


def row_t4(size: str, folder: Path, dry_run: bool) -> dict:
    """A T4 on this GPU: planned for capability 7.5 (fp16, GradScaler), memory capped at 15 GB. 0.6B: notebook
    03's train() end to end; 4B: QLoRA through the merge, then one 16-bit slerp candidate encoding the dev
    documents, the phase the slerp choice adds (its scoring needs ranx, not in the kit)."""
    import torch

    from embtune.data import load_beir
    from embtune.encode import encode
    from embtune.merge import slerp_models
    from embtune.models import load_embedder
    from embtune.train import TrainConfig, train

    if not dry_run:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total))
    model = str(write_random_model(size, folder, dry_run))
    run = folder / "run"
    log = train(TrainConfig(base_model=model, data_dir=str(ROOT / "data_samples" / "pydocs"), run_dir=str(run),
                            max_steps=2 if dry_run else 4, eval_steps=2 if dry_run else 4, batch_size=32,
                            max_seq_length=64 if dry_run else 512, merge_with_base=1.0))  # fmt: skip
    checks = {"fp16 (sm 7.5)": "mixed precision fp16" in log["backend"] or dry_run,
              "loss finite": all(torch.isfinite(torch.tensor(p["loss"])) for p in log["loss_curve"])}
    if size == "4B" or dry_run:
        dtype = {"model_kwargs": {"dtype": torch.float16}} if not dry_run else {}
        candidate = load_embedder(str(slerp_models(model, log["finetuned_model"], 0.5, folder / "cand")), **dtype)
        docs = list(load_beir(ROOT / "data_samples" / "pydocs").doc_texts().values())[:256]
        checks["a 16-bit candidate encodes"] = encode(candidate, docs, "document", batch_size=32).shape[0] == len(docs)
    peak = _peak_gb(torch)
    checks[f"peak {peak} GB <= 15 GB"] = dry_run or peak <= T4_BYTES / 1e9
    failed = [name for name, ok in checks.items() if not ok]
    return {"backend": log["backend"].split(" | why")[0], "peak_vram_gb": peak,
            "result": ("FAILED: " + "; ".join(failed) if failed else "ok") + f" ({log['steps']} steps)"}


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
    kind, *args = name.split(":")
    rows = {"env": row_env, "parity": row_parity, "notebook03": row_notebook03, "reranker": row_reranker,
            "t4": row_t4, "train": row_train}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "t4" and not dry_run:
            os.environ["EMBTUNE_CUDA_CAPABILITY"] = "7.5"  # before anything plans
        return rows[kind](*args, Path(tmp), dry_run)


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
