"""Notebook 06: fine-tune a reranker on notebook 02's hard negatives.

The objective is the Qwen3 paper's point-wise SFT: -log p(yes) for a relevant pair, -log p(no) for a negative.
With sentence-transformers' `LogitScore` (logit(yes) - logit(no)) and `BinaryCrossEntropyLoss` that is exactly
the cross-entropy over the two answer tokens; the same loss trains a BERT-style CrossEncoder's head. LoRA (4-bit
on a GPU) above 300M parameters, full fine-tuning below, as for the embedder; the template is
`rerank.CHAT_TEMPLATE`, saved with the model. A causal LM is loaded by unsloth's `FastLanguageModel` on a CUDA
GPU (`backend="unsloth"` forces it, and on a CPU it runs in unsloth's CPU fallback), else by transformers + peft.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import DEFAULT_DOC_TEMPLATE, load_beir, training_labels
from .files import replace_dir, write_json
from .rerank import is_causal, is_causal_lm, load_reranker
from .train import (
    QWEN_TARGET_MODULES,
    _keep_4bit_differentiable,
    _target_modules,
    last_complete_checkpoint,
    plan,
    quantization_kwargs,
    split_train_dev,
)


@dataclass
class RerankConfig:
    base_model: str  # a Qwen3-Reranker (or any causal LM with yes/no tokens) or a sentence-transformers CrossEncoder
    data_dir: str
    run_dir: str
    instruction: str | None = None  # None: Qwen's web-search task
    doc_template: str = DEFAULT_DOC_TEMPLATE
    max_negatives: int = 3  # negatives per (query, positive) from notebook 02, each a "no" example
    backend: str = "auto"  # unsloth | peft | auto (unsloth for a causal LM on a CUDA GPU, else peft)
    quant: str = "auto"  # 4bit | 8bit | none | auto (4bit for LoRA on CUDA, else none)
    full_finetune: bool | None = None  # None: full below 300M parameters, LoRA above
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_TARGET_MODULES))
    max_length: int = 512  # tokens of template + query + document
    batch_size: int = 8
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float | None = None  # None: 1e-4 for LoRA, 2e-5 for full fine-tuning
    warmup_ratio: float = 0.1
    save_steps: int = 50
    dev_fraction: float = 0.1  # the same dev queries as notebook 03 are held out
    seed: int = 42


def pointwise_rows(config: RerankConfig) -> dict[str, list]:
    """(query, document, label) columns: each training query's positive (1) and up to `max_negatives` of its
    mined negatives (0). Dev queries are left out."""
    negatives = Path(config.run_dir) / "hard_negatives" / "train.jsonl"
    if not negatives.exists():
        raise FileNotFoundError(f"{negatives} is missing: run notebook 02 (hard negatives) first")
    data = load_beir(config.data_dir, limits="off")
    train_qrels, _ = split_train_dev(data, training_labels(data, config.run_dir), config)
    columns = {"query": [], "document": [], "label": []}
    for line in negatives.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["query_id"] not in train_qrels:
            continue
        for text, label in [(row["positive"], 1.0)] + [(n, 0.0) for n in row["negatives"][: config.max_negatives]]:
            columns["query"].append(row["query"])
            columns["document"].append(text)
            columns["label"].append(label)
    return columns


def load_for_training(config: RerankConfig):
    """(model, description): the reranker, quantised and with LoRA as configured."""
    from .models import resolve

    path = resolve(config.base_model, "RERANKER")
    how = plan(config, path)  # the embedder's rule: full below 300M parameters, 4-bit LoRA on a GPU above
    full, quant = how.full_finetune, how.quant
    if config.backend not in ("auto", "unsloth", "peft"):
        raise ValueError(f'backend must be "unsloth", "peft" or "auto", not {config.backend!r}')
    causal = is_causal_lm(path)
    if config.backend == "unsloth" and not causal:
        raise ValueError(f"{path} is a cross-encoder; unsloth trains causal LMs only: set backend='peft'")
    unsloth = causal and (config.backend == "unsloth" or (config.backend == "auto" and how.backend == "unsloth"))
    model = (_unsloth_model if unsloth else _peft_model)(path, config, quant, full)
    kind = "causal LM, P(yes)" if causal else "cross-encoder"
    mode = "full fine-tuning" if full else f"LoRA r={config.lora_r}"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backend = "unsloth FastLanguageModel" if unsloth else "sentence-transformers + peft"
    return model, f"{kind} | {backend} | {quant} | {mode} | {trainable:,} parameters trainable"


def _peft_model(path: str, config: RerankConfig, quant: str, full: bool):
    from peft import LoraConfig

    model = load_reranker(path, max_length=config.max_length, model_kwargs=quantization_kwargs(quant))
    _keep_4bit_differentiable(model)
    if not full:
        if quant != "none":
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(model[0].model, use_gradient_checkpointing=False)
        targets = _target_modules(model[0].model, config.target_modules)
        model.add_adapter(LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                     target_modules=targets, bias="none"))  # fmt: skip
    return model


def _unsloth_model(path: str, config: RerankConfig, quant: str, full: bool):
    """The causal LM loaded (and LoRA-wrapped) by unsloth, inside the CrossEncoder that reads its yes/no
    logits. The CrossEncoder is built on the meta device, so the weights are loaded once, by unsloth."""
    from unsloth import FastLanguageModel

    lm, _ = FastLanguageModel.from_pretrained(path, max_seq_length=config.max_length, load_in_4bit=quant == "4bit",
                                              load_in_8bit=quant == "8bit", full_finetuning=full)  # fmt: skip
    if not full:
        lm = FastLanguageModel.get_peft_model(
            lm,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_target_modules(lm, config.target_modules),
            use_gradient_checkpointing="unsloth" if torch.cuda.is_available() else False,
            random_state=config.seed,
        )
    model = load_reranker(path, max_length=config.max_length, model_kwargs={"device_map": "meta"})
    model[0].model = lm
    return model


def merge_reranker(base_model: str, adapter_dir: str | Path, out: str | Path, max_length: int = 512) -> Path:
    """Fold a LoRA adapter into an unquantised copy of its base; a plain CrossEncoder folder with the template."""
    from peft import PeftModel

    model = load_reranker(base_model, device="cpu", max_length=max_length)
    model[0].model = PeftModel.from_pretrained(model[0].model, str(adapter_dir)).merge_and_unload()
    with replace_dir(out) as tmp:
        model.save(str(tmp))
    return Path(out)


def train_reranker(config: RerankConfig) -> dict:
    """Train, save `run_dir/reranker/adapter/` (LoRA) and `run_dir/reranker/model/`; returns the log."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    out = Path(config.run_dir) / "reranker"
    dataset = Dataset.from_dict(pointwise_rows(config))
    model, description = load_for_training(config)
    print(description, flush=True)
    lora = hasattr(model[0].model, "peft_config")
    args = CrossEncoderTrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate or (1e-4 if lora else 2e-5),
        warmup_steps=config.warmup_ratio,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=max(1, config.save_steps // 5),
        seed=config.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        # the instruction, as the system message the template reads; scoring passes the same `prompt`
        prompts=config.instruction if config.instruction and is_causal(model) else None,
    )
    # Each positive comes with up to `max_negatives` negatives: weigh positives by the ratio so both classes count
    # alike (sentence-transformers' reranker recipe; the ranking, not P(yes)'s calibration, is what matters).
    n_positive = int(sum(dataset["label"]))
    pos_weight = torch.tensor((len(dataset) - n_positive) / max(1, n_positive))
    loss = BinaryCrossEntropyLoss(model, pos_weight=pos_weight)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out / "checkpoints"))
    log = {
        "backend": description,
        "config": asdict(config),
        "n_rows": len(dataset),
        "n_positive": n_positive,
        "pos_weight": round(float(pos_weight), 4),
        "steps": trainer.state.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
    }
    if lora:
        with replace_dir(out / "adapter") as tmp:
            model.save(str(tmp))
        merge_reranker(config.base_model, out / "adapter", out / "model", config.max_length)
    else:
        with replace_dir(out / "model") as tmp:
            model.save(str(tmp))
    write_json(out / "train_log.json", log)
    return log
