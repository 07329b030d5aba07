"""Notebook 06: fine-tune a reranker on notebook 02's hard negatives.

The objective is the Qwen3 paper's point-wise SFT: -log p(yes) for a relevant pair, -log p(no) for a negative.
With sentence-transformers' `LogitScore` (logit(yes) - logit(no)) and `BinaryCrossEntropyLoss` that is exactly
the cross-entropy over the two answer tokens; the same loss trains a BERT-style CrossEncoder's head. Loading,
LoRA, quantisation and precision follow the embedder's plan (`embtune.lora`); the template is
`rerank.CHAT_TEMPLATE`, saved with the model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from .config import POSITIVE, STEPS, DevSplit, Reuse, StepConfig, TrainingData, at_least, between, one_of
from .data import load_beir, split_train_dev, training_labels
from .files import replace_dir, write_json
from .lora import LoraOptions, finish, load_reranker_for_training, plan
from .rerank import instruction_prompt, is_causal, is_causal_lm
from .rundir import (
    RunDir,
    check_outputs,
    data_fingerprint,
    fingerprint,
    judged_dev_fingerprint,
    last_complete_checkpoint,
    make_manifest,
    model_fingerprint,
)


@dataclass(kw_only=True)
class RerankConfig(StepConfig, Reuse, TrainingData, DevSplit, LoraOptions):
    # base_model is the dense retriever the rerankers re-score (run_dir/model/ when notebook 03 wrote it)
    reranker_model: str = ""  # a Qwen3-Reranker (or any causal LM with yes/no tokens) or a CrossEncoder
    max_negatives: int = 3  # negatives per (query, positive) from notebook 02, each a "no" example
    max_length: int = 512  # tokens of template + query + document
    batch_size: int = 8
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float | None = None  # None: 1e-4 for LoRA, 2e-5 for full fine-tuning
    warmup_ratio: float = 0.1
    save_steps: int = 50
    rerank_top_k: int = 100  # dense candidates per query the rerankers re-score
    rerank_max_length: int = 1024  # tokens of instruction + query + document a reranker reads when scoring
    split: str | None = None  # evaluation split; None: "test", else "dev"

    RULES = {"max_negatives": at_least(0), "max_length": at_least(16), "batch_size": at_least(1), "epochs": POSITIVE,
             "max_steps": STEPS, "learning_rate": POSITIVE, "warmup_ratio": between(0, 1, high_open=True),
             "save_steps": at_least(1), "rerank_top_k": at_least(1), "rerank_max_length": at_least(16),
             "split": one_of("test", "dev")}  # fmt: skip


def pointwise_rows(config: RerankConfig) -> dict[str, list]:
    """(query, document, label) columns: each training query's positive (1) and up to `max_negatives` of its
    mined negatives (0). Dev queries are left out."""
    run = RunDir(config.run_dir)
    negatives = run.hard_negatives
    if not negatives.exists():
        raise FileNotFoundError(f"{negatives} is missing: run notebook 02 (hard negatives) first")
    if not run.current("hard_negatives", data=data_fingerprint(config.data_dir)):
        raise FileNotFoundError(f"{negatives} was mined from other data: run notebook 02 again first")
    data = load_beir(config.data_dir, limits="off", run_dir=config.run_dir)
    labels = training_labels(data, config.run_dir, config.split_overlap)
    train_qrels, _ = split_train_dev(data, labels, config.seed, config.dev_fraction)
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
    """(model, plan): the reranker, quantised and with LoRA as planned."""
    from .models import resolve

    path = resolve(config.reranker_model, "RERANKER")
    how = plan(config, path, "causal_lm" if is_causal_lm(path) else "cross_encoder")
    model = load_reranker_for_training(path, config, how, config.max_length, config.seed)
    return model, finish(model, how)


def train_reranker(config: RerankConfig) -> dict:
    """Train, save `run_dir/reranker/adapter/` (LoRA) and `run_dir/reranker/model/`; returns the log."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    from .merge import merge_adapter

    set_seed(config.seed)  # before the model is built: LoRA's initial weights are drawn then
    from .models import resolve

    run = RunDir(config.run_dir)
    out = run.reranker
    base = resolve(config.reranker_model, "RERANKER")
    check_outputs(config.run_dir, reranker_model=base, data_dir=config.data_dir)
    dataset = Dataset.from_dict(pointwise_rows(config))
    inputs = {"data": data_fingerprint(config.data_dir), "reranker_model": model_fingerprint(base),
              "hard_negatives": fingerprint(run.manifest("hard_negatives")),
              "judged_dev": judged_dev_fingerprint(config.run_dir)}  # fmt: skip
    shaping = {k: v for k, v in asdict(config).items() if k not in ("data_dir", "run_dir", "base_model", "reuse",
                                                                      "rerank_top_k", "rerank_max_length",
                                                                      "split")}  # fmt: skip
    made_from = make_manifest(inputs, shaping)
    run.reusable("reranker_checkpoints", made_from, config.reuse, [out / "checkpoints"])
    run.record("reranker_checkpoints", made_from)
    model, how = load_for_training(config)
    kind = "causal LM, P(yes)" if is_causal(model) else "cross-encoder"
    print(f"{kind} | {how}", flush=True)
    args = CrossEncoderTrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate or (2e-5 if how.full_finetune else 1e-4),
        warmup_steps=config.warmup_ratio,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=max(1, config.save_steps // 5),
        seed=config.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        # the instruction, as the system message the template reads; scoring passes the same `prompt`
        prompts=instruction_prompt(model, config.instruction),
        **how.trainer_args(),
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
        "backend": f"{kind} | {how}",
        "config": asdict(config),
        "n_rows": len(dataset),
        "n_positive": n_positive,
        "pos_weight": round(float(pos_weight), 4),
        "steps": trainer.state.global_step,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
    }
    run.forget("reranker")
    if how.full_finetune:
        with replace_dir(out / "model") as tmp:
            model.save(str(tmp))
    else:
        with replace_dir(out / "adapter") as tmp:
            model.save(str(tmp))
        merge_adapter(config.reranker_model, out / "adapter", out / "model")
    write_json(out / "train_log.json", log)
    run.record("reranker", made_from)
    return log
