"""Contrastive fine-tuning of an embedder: QLoRA on a GPU (unsloth), LoRA or full fine-tuning anywhere.

`train(TrainConfig(...))` is what notebook 03 calls. The same function is a command-line entry point
that runs unchanged under `torchrun --nproc_per_node N` or `accelerate launch` (DDP, with negatives
gathered across devices):

    torchrun --nproc_per_node 2 -m embtune.train --base_model M --data_dir D --run_dir R [--field value ...]

Outputs in `run_dir`: `checkpoints/` (resumable), `adapter/` (LoRA), `model/` (merged, a plain
sentence-transformers folder with the query prompt), `train_log.json`, `train_loss.png`; with
`merge_with_base` below 1, `finetuned/` holds the model as trained and `model/` its slerp with the base.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import DEFAULT_DOC_TEMPLATE, BeirData, TrainingLabels, load_beir, training_labels
from .encode import prepare, query_prompt
from .files import replace_dir, write_json
from .losses import build_loss

QWEN_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_MODEL_PARAMS = 300_000_000  # below this, full fine-tuning fits anywhere and LoRA only costs quality


@dataclass
class TrainConfig:
    base_model: str
    data_dir: str
    run_dir: str
    instruction: str | None = None  # None: the model's own query prompt; "": none
    doc_template: str = DEFAULT_DOC_TEMPLATE
    # loss
    loss: str = "qwen3"  # qwen3 | cached_qwen3 | mnrl | cached_mnrl | triplet
    temperature: float = 0.05
    matryoshka_dims: list[int] | None = None
    mini_batch_size: int = 16  # GradCache chunk for the cached losses
    max_negatives: int = 1  # hard negatives per row from notebook 02; each one adds a full batch of sequences
    # model
    quant: str = "auto"  # 4bit | 8bit | none | auto (4bit for LoRA on CUDA, else none)
    full_finetune: bool | None = None  # None: full below 300M parameters, LoRA above
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_TARGET_MODULES))
    max_seq_length: int = 512  # a cap: never above the model's own limit (MiniLM: 256)
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    # schedule
    batch_size: int = 32
    epochs: float = 3.0  # with the best dev checkpoint kept, small data sets gain from several passes
    max_steps: int = -1
    learning_rate: float | None = None  # None: 2e-4 for LoRA, 5e-5 for full fine-tuning
    warmup_ratio: float = 0.1
    eval_steps: int = 50
    eval_corpus_size: int = 2000
    dev_fraction: float = 0.1  # held out of train when the data has no dev split
    seed: int = 42
    merge_dtype: str = "auto"  # auto (bf16/fp16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32
    # Slerp of the trained weights toward the base (1: as trained; 0.5: half-way). None: 1 with human labels,
    # 0.5 with synthetic ones only, whose dev split cannot catch drift toward the generator's artefacts;
    # interpolating with the base keeps its general skill (WiSE-FT; the Qwen3 report merges checkpoints by
    # slerp). SciFact without labels, ICT queries, MiniLM: 0.633 as trained, 0.656 at 0.5, base 0.645.
    merge_with_base: float | None = None


@dataclass
class Plan:
    """How `load_for_training` will load and train the model on this machine, and why."""

    backend: str  # "unsloth" or "sentence-transformers + peft"
    why: str
    quant: str  # "4bit" | "8bit" | "none"
    full_finetune: bool
    approx_params: int

    def __str__(self):
        mode = "full fine-tuning" if self.full_finetune else "LoRA"
        return f"{self.backend} | {self.quant} | {mode} | ~{self.approx_params / 1e6:,.1f}M parameters | {self.why}"


def _approx_params(path: str) -> int:
    """Parameter count from the config alone (embeddings + attention + MLP), to decide before loading."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    mlp = getattr(cfg, "intermediate_size", 4 * h)
    return cfg.vocab_size * h + layers * (4 * h * h + 3 * h * mlp)


def plan(config: TrainConfig, path: str) -> Plan:
    """Small models (< 300M parameters) are fully fine-tuned unquantised; larger ones get LoRA, 4-bit on a GPU.
    unsloth on a CUDA GPU, sentence-transformers + peft (+ bitsandbytes) elsewhere."""
    approx = _approx_params(path)
    full = config.full_finetune if config.full_finetune is not None else approx < SMALL_MODEL_PARAMS
    quant = config.quant
    if quant == "auto":
        quant = "4bit" if torch.cuda.is_available() and not full else "none"
    if quant not in ("4bit", "8bit", "none"):
        raise ValueError(f'quant must be "4bit", "8bit", "none" or "auto", not {config.quant!r}')
    if full and quant != "none":
        raise ValueError("full fine-tuning needs quant='none' (quantised weights cannot be trained)")
    backend, why = "sentence-transformers + peft", "no CUDA GPU: unsloth's FastSentenceTransformer needs one"
    if torch.cuda.is_available():
        try:
            import unsloth  # noqa: F401

            backend, why = "unsloth", f"CUDA GPU: {torch.cuda.get_device_name(0)}"
        except Exception as e:  # unsloth raises more than ImportError when it cannot patch
            why = f"unsloth unavailable ({type(e).__name__}: {e})"
    return Plan(backend, why, quant, full, approx)


def _target_modules(module: torch.nn.Module, wanted: list[str]) -> list[str] | str:
    """The requested projection names that the model has; "all-linear" when it has none (e.g. BERT)."""
    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    present = [w for w in wanted if w in names]
    return present or "all-linear"


def _keep_4bit_differentiable(model) -> None:
    """bitsandbytes (0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first no-grad eval
    forward (e.g. a dev evaluation) and keeps using that kernel afterwards, which has no autograd: every
    gradient below that layer is then silently wrong. Training on the CPU must never take that path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantization_kwargs(quant: str) -> dict:
    """transformers `model_kwargs` for bitsandbytes 4-bit (NF4) or 8-bit weights; none for "none"."""
    if quant == "none":
        return {}
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=quant == "4bit",
            load_in_8bit=quant == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    }


def load_for_training(config: TrainConfig):
    """(model, description): the base model ready to train, quantised and with LoRA as configured."""
    from sentence_transformers import SentenceTransformer

    from .models import resolve

    path = resolve(config.base_model)
    how = plan(config, path)
    backend, quant, full = how.backend, how.quant, how.full_finetune
    if backend == "unsloth":
        from unsloth import FastSentenceTransformer

        model = FastSentenceTransformer.from_pretrained(
            path,
            max_seq_length=config.max_seq_length,
            load_in_4bit=quant == "4bit",
            load_in_8bit=quant == "8bit",
            load_in_16bit=quant == "none",
            full_finetuning=full,
        )
    else:
        model = SentenceTransformer(path, model_kwargs=quantization_kwargs(quant), trust_remote_code=False)
        if quant == "4bit":
            _keep_4bit_differentiable(model)
    # Positions past the model's trained length are untrained, and attention memory grows with its square.
    model.max_seq_length = min(model.max_seq_length or config.max_seq_length, config.max_seq_length)
    prepare(model)
    n_params = sum(p.numel() for p in model.parameters())
    gradient_checkpointing = (
        config.gradient_checkpointing if config.gradient_checkpointing is not None else torch.cuda.is_available()
    )
    inner = model[0].auto_model
    if not full:
        targets = _target_modules(inner, config.target_modules)
        if backend == "unsloth":
            model = FastSentenceTransformer.get_peft_model(
                model,
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=targets,
                use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
                random_state=config.seed,
            )
        else:
            from peft import LoraConfig, prepare_model_for_kbit_training

            if quant != "none":
                prepare_model_for_kbit_training(inner, use_gradient_checkpointing=gradient_checkpointing)
            # sentence-transformers' own adapter support: checkpoints and saves hold the adapter only.
            model.add_adapter(
                LoraConfig(
                    r=config.lora_r,
                    lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout,
                    target_modules=targets,
                    bias="none",
                )
            )
    if gradient_checkpointing and backend != "unsloth":
        model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mode = "full fine-tuning" if full else f"LoRA r={config.lora_r}"
    description = (
        f"{backend} | {quant} | {mode} | {trainable:,} of {n_params:,} parameters trainable | "
        f"gradient checkpointing {'on' if gradient_checkpointing else 'off'} | why: {how.why}"
    )
    return model, description


def split_train_dev(data: BeirData, labels: TrainingLabels, config: TrainConfig) -> tuple[dict, dict]:
    """(train qrels, dev qrels): the data's own dev split, else a seeded slice of the labelled training queries
    (of the synthetic ones too when fewer than 20 are labelled)."""
    if not labels.qrels:
        raise ValueError(
            f"{data.path}: no qrels/train.tsv and no synthetic queries in {config.run_dir}/synthetic; "
            "add training labels or run notebook 01 first (GENERATOR=ict needs no LLM)"
        )
    if "dev" in data.qrels:
        return labels.qrels, data.relevant("dev")
    pool = sorted(labels.labelled) if len(labels.labelled) >= 20 else sorted(labels.qrels)
    random.Random(config.seed).shuffle(pool)
    n_dev = min(200, int(len(pool) * config.dev_fraction)) if len(pool) >= 20 else 0
    dev_ids = set(pool[:n_dev])
    return {q: d for q, d in labels.qrels.items() if q not in dev_ids}, {q: labels.qrels[q] for q in dev_ids}


def training_dataset(data: BeirData, labels: TrainingLabels, train_qrels: dict, config: TrainConfig):
    """Rows (anchor, positive[, negative_1..n]) from notebook 02's hard negatives when present, else pairs
    from the train labels plus notebook 01's synthetic queries. Dev queries never enter training."""
    from datasets import Dataset, DatasetDict

    negatives_file = Path(config.run_dir) / "hard_negatives" / "train.jsonl"
    if negatives_file.exists():
        rows = [json.loads(line) for line in negatives_file.read_text(encoding="utf-8").splitlines() if line]
        rows = [r for r in rows if r["query_id"] in train_qrels]
        k = config.max_negatives
        # Rows whose filters left fewer than k negatives train on in-batch negatives only, in their own set:
        # a batch comes from one set at a time, so every row of a batch has the same columns.
        full = [r for r in rows if len(r["negatives"]) >= k]
        short = [r for r in rows if len(r["negatives"]) < k]
        sets = {}
        if full:
            columns = {"anchor": [r["query"] for r in full], "positive": [r["positive"] for r in full]}
            sets["hard_negatives"] = Dataset.from_dict(
                {**columns, **{f"negative_{i + 1}": [r["negatives"][i] for r in full] for i in range(k)}}
            )
        if short:
            sets["pairs"] = Dataset.from_dict(
                {"anchor": [r["query"] for r in short], "positive": [r["positive"] for r in short]}
            )
        return DatasetDict(sets) if len(sets) > 1 else next(iter(sets.values()))
    docs = data.doc_texts(config.doc_template)
    pairs = [
        (labels.queries[q], labels.positive_text(q, d, docs, config.doc_template))
        for q, ds in train_qrels.items()
        for d in ds
    ]
    return Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})


def dev_evaluator(data: BeirData, queries: dict, dev_qrels: dict, config: TrainConfig, prompt: str):
    """NDCG@10 on the dev queries against their positives plus a seeded sample of the corpus."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    docs = data.doc_texts(config.doc_template)
    keep = {d for ds in dev_qrels.values() for d in ds}
    others = sorted(set(docs) - keep)
    random.Random(config.seed).shuffle(others)
    keep |= set(others[: max(0, config.eval_corpus_size - len(keep))])
    return InformationRetrievalEvaluator(
        {q: queries[q] for q in dev_qrels},
        {d: docs[d] for d in sorted(keep)},
        {q: set(ds) for q, ds in dev_qrels.items()},
        name="dev",
        query_prompt=prompt or None,
        ndcg_at_k=[10],
        mrr_at_k=[10],
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[10],
        map_at_k=[100],
        write_csv=False,
    )


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _merge_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (its trainer_state.json is written last); a
    half-written one, left by a kill during saving, is removed so it cannot be resumed from or rotated."""
    done = None
    for path in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        if (path / "trainer_state.json").exists():
            done = path
        else:
            shutil.rmtree(path)
    return str(done) if done else None


def _final_step_callback():
    """Evaluate and checkpoint at the last step too, so the best-checkpoint choice sees the finished model
    and a short run still leaves a checkpoint (the Trainer only does so at multiples of eval_steps)."""
    from transformers import TrainerCallback

    class FinalStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = args.eval_strategy != "no"
                control.should_save = True
            return control

    return FinalStep()


def train(config: TrainConfig, callbacks: list | None = None) -> dict:
    """Train, keep the best dev checkpoint, save adapter and merged model; returns the training log.
    `callbacks`: extra transformers TrainerCallbacks (logging to your tracker, timing steps)."""
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.training_args import BatchSamplers

    from .merge import merge_adapter, slerp_models
    from .models import resolve

    run_dir = Path(config.run_dir)
    data = load_beir(config.data_dir, limits="off")
    labels = training_labels(data, config.run_dir)
    train_qrels, dev_qrels = split_train_dev(data, labels, config)
    model, backend = load_for_training(config)
    print(backend, flush=True)
    prompt = query_prompt(model, config.instruction)
    dataset = training_dataset(data, labels, train_qrels, config)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun / accelerate launch
    loss = build_loss(
        config.loss,
        model,
        config.temperature,
        config.matryoshka_dims,
        config.mini_batch_size,
        gather_across_devices=distributed,
    )
    if config.loss == "triplet" and isinstance(dataset, DatasetDict):
        dataset = dataset["hard_negatives"]  # the triplet loss needs a negative in every row
    sets = list(dataset.values()) if isinstance(dataset, DatasetDict) else [dataset]
    if config.loss == "triplet" and "negative_1" not in sets[0].column_names:
        raise ValueError("the triplet loss needs hard negatives: run notebook 02 first, or pick loss='qwen3'")
    full = not hasattr(model[0].auto_model, "peft_config")  # LoRA: transformers or unsloth adapter
    evaluator = dev_evaluator(data, labels.queries, dev_qrels, config, prompt) if dev_qrels else None
    checkpoints = run_dir / "checkpoints"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate or (5e-5 if full else 2e-4),
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of all steps
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate in the batch would be its own false negative
        prompts={"anchor": prompt} if prompt else None,
        eval_strategy="steps" if evaluator else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=evaluator is not None,
        metric_for_best_model="eval_dev_cosine_ndcg@10" if evaluator else None,
        greater_is_better=True,
        logging_steps=max(1, config.eval_steps // 5),
        seed=config.seed,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPUs real DDP (gloo)
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=[_final_step_callback(), *(callbacks or [])],
    )
    resume = last_complete_checkpoint(checkpoints)
    if resume:
        print(f"resuming from {resume}", flush=True)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    log = {
        "backend": backend,
        "config": dataclasses.asdict(config),
        "n_train_rows": sum(len(d) for d in sets),
        "world_size": args.world_size,
        "n_dev_queries": len(dev_qrels),
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "eval_curve": [
            {"step": h["step"], "ndcg@10": h["eval_dev_cosine_ndcg@10"]}
            for h in trainer.state.log_history
            if "eval_dev_cosine_ndcg@10" in h
        ],
    }
    if not trainer.is_world_process_zero():
        return log
    model.prompts = {**model.prompts, "query": prompt, "document": model.prompts.get("document", "")}
    t = config.merge_with_base if config.merge_with_base is not None else (1.0 if labels.labelled else 0.5)
    if not 0 <= t <= 1:
        raise ValueError(f"merge_with_base must be between 0 (the base) and 1 (as trained), not {t}")
    trained = run_dir / ("model" if t >= 1 else "finetuned")
    if full:
        with replace_dir(trained) as tmp:
            model.save(str(tmp))
    else:
        with replace_dir(run_dir / "adapter") as tmp:
            model.save(str(tmp))
        merge_adapter(config.base_model, run_dir / "adapter", trained, _merge_dtype(config.merge_dtype))
    if t < 1:
        merged = slerp_models(resolve(config.base_model), trained, t)
        merged.prompts = model.prompts
        with replace_dir(run_dir / "model") as tmp:
            merged.save(str(tmp))
    log["merge_with_base"] = t
    log["finetuned_model"] = str(trained)
    write_json(run_dir / "train_log.json", log)
    plot_training(log, run_dir / "train_loss.png")
    return log


def plot_training(log: dict, path):
    """Training loss and dev NDCG@10 against step, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([p["step"] for p in log["loss_curve"]], [p["loss"] for p in log["loss_curve"]], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if log["eval_curve"]:
        dev = ax.twinx()
        dev.plot(
            [p["step"] for p in log["eval_curve"]],
            [p["ndcg@10"] for p in log["eval_curve"]],
            "o-",
            color="tab:orange",
            label="dev NDCG@10",
        )
        dev.set_ylabel("dev NDCG@10")
        dev.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return fig


def parse_args(argv: list[str]) -> TrainConfig:
    """Every TrainConfig field as `--field value` (lists and None as JSON, e.g. --matryoshka_dims '[384,64]')."""
    parser = argparse.ArgumentParser(description="Contrastive fine-tuning (run under torchrun for DDP)")
    for f in dataclasses.fields(TrainConfig):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        parser.add_argument(f"--{f.name}", required=required)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    for f in dataclasses.fields(TrainConfig):
        if f.name in values and f.type not in ("str", "str | None"):
            values[f.name] = json.loads(values[f.name])
    return TrainConfig(**values)


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
