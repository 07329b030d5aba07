"""Notebook 03: contrastive fine-tuning of an embedder: QLoRA on a GPU (unsloth), LoRA or full fine-tuning anywhere.

`train(TrainConfig(...))` is what notebook 03 calls: `build_trainer` (data, model, loss, evaluator, Trainer), the
Trainer's own loop (resumed from the last complete checkpoint), then `save_outputs`. The same function is a
command-line entry point that runs unchanged under `torchrun --nproc_per_node N` or `accelerate launch` (DDP,
with negatives gathered across devices):

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
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import POSITIVE, STEPS, DevSplit, Reuse, Rule, StepConfig, TrainingData, at_least, between, each, one_of
from .data import BeirData, TrainingLabels, load_beir, split_train_dev, training_labels
from .encode import query_prompt
from .files import replace_dir, write_json, write_text
from .lora import LoraOptions, Plan, compute_dtype, finish, load_embedder_for_training, plan
from .losses import LOSSES, build_loss
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

# Settings that do not change what training makes, only where it goes or what is done with it afterwards.
NOT_SHAPING = {"data_dir", "run_dir", "base_model", "merge_dtype", "merge_with_base", "merge_grid", "reuse"}


@dataclass(kw_only=True)
class TrainConfig(StepConfig, Reuse, TrainingData, DevSplit, LoraOptions):
    # loss
    # qwen3 | cached_qwen3 | mnrl | cached_mnrl | triplet; "auto": qwen3, or its cached (GradCache) version when
    # the memory plan needs it (the same batch and gradients in less memory)
    loss: str = "auto"
    temperature: float = 0.05
    matryoshka_dims: list[int] | None = None
    mini_batch_size: int | None = None  # GradCache chunk of the cached losses; None: the largest that fits
    max_negatives: int = 1  # hard negatives per row from notebook 02; each one adds a full batch of sequences
    max_seq_length: int = 512  # a cap: never above the model's own limit (MiniLM: 256)
    # schedule
    batch_size: int = 32
    epochs: float = 3.0  # small data sets gain from several passes (an earlier checkpoint ships if clearly better)
    max_steps: int = -1
    learning_rate: float | None = None  # None: 2e-4 for LoRA, 5e-5 for full fine-tuning
    warmup_ratio: float = 0.1
    eval_steps: int | None = None  # evaluate on dev (and checkpoint) every N steps; None: 5 times, and at step 0
    eval_corpus_size: int = 2000
    merge_dtype: str = "auto"  # the merged model's dtype: auto (the base checkpoint's) | bfloat16 | float16 | float32
    # What ships as model/: the slerp of the base and the trained weights at t (0: the base, 1: as trained).
    # "auto": as trained (t = 1), unless it does not beat the base on the dev queries (then the base: the run never
    # hands over a model its dev queries do not show to be better), or another t of `merge_grid` beats t = 1
    # clearly (evaluate.choose_on_dev: a paired test, not the maximum; WiSE-FT; the Qwen3 report merges by slerp);
    # trained on synthetic queries alone with no dev split in the data (judged queries), 0.5, since a dev split of
    # synthetic queries cannot see the model drift toward the generator's habits. A number forces t.
    merge_with_base: float | str = "auto"
    merge_grid: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])

    RULES = {"loss": one_of("auto", *LOSSES), "temperature": POSITIVE, "matryoshka_dims": each(at_least(1)),
             "mini_batch_size": at_least(1), "max_negatives": at_least(0), "max_seq_length": at_least(8),
             "batch_size": at_least(1), "epochs": POSITIVE, "max_steps": STEPS, "learning_rate": POSITIVE,
             "warmup_ratio": between(0, 1, high_open=True), "eval_steps": at_least(1), "eval_corpus_size": at_least(1),
             "merge_dtype": one_of("auto", "bfloat16", "float16", "float32"),
             "merge_with_base": Rule(lambda v: v == "auto" or (not isinstance(v, str) and 0 <= v <= 1),
                                     '"auto" or a number from 0 (the base) to 1 (as trained)'),
             "merge_grid": each(between(0, 1))}  # fmt: skip


def load_for_training(config: TrainConfig):
    """(model, plan): the base model ready to train, quantised and with LoRA as planned."""
    from .models import resolve

    path = resolve(config.base_model)
    how = plan(config, path)
    model = load_embedder_for_training(path, config, how, config.max_seq_length, config.seed)
    return model, finish(model, how)


def fit_memory(config: TrainConfig, dataset) -> TrainConfig:
    """The memory plan (`embtune.memory`), before any weight is loaded: prints the estimate and what it turned on
    (gradient checkpointing, the cached loss), and returns the config with those settings; NotEnoughMemory, one
    line naming what would fit, when nothing does."""
    from .memory import plan_memory, return_freed_blocks
    from .models import resolve

    path = resolve(config.base_model)
    memory = plan_memory(config, path, plan(config, path), dataset)
    print(memory, flush=True)
    write_text(RunDir(config.run_dir).memory_plan, f"{memory}\n")  # what `make run-all` quotes if the kernel dies
    if memory.device == "cpu" and memory.mini_batch_size is not None:
        return_freed_blocks()  # the cached loss's freed mini-batch activations would stay resident
    return memory.apply(config)


def inputs(config: TrainConfig, labels: TrainingLabels) -> dict[str, str | None]:
    """Fingerprints of what training reads: the data, the base model, notebook 00's judged dev queries, notebook 01's
    synthetic queries and notebook 02's hard negatives when it uses them (mined from this data and these synthetic
    queries)."""
    from .models import resolve

    run = RunDir(config.run_dir)
    found = {"data": data_fingerprint(config.data_dir), "base_model": model_fingerprint(resolve(config.base_model)),
             "synthetic": fingerprint(run.manifest("synthetic")) if labels.uses_synthetic else None,
             "judged_dev": judged_dev_fingerprint(config.run_dir)}  # fmt: skip
    mined = run.hard_negatives.exists() and run.current("hard_negatives", data=found["data"],
                                                         synthetic=found["synthetic"])  # fmt: skip
    if run.hard_negatives.exists() and not mined:
        print(f"{run.hard_negatives} was mined from other data or queries: not used (run notebook 02 again)")
    found["hard_negatives"] = fingerprint(run.manifest("hard_negatives")) if mined else None
    return found


def training_dataset(data: BeirData, labels: TrainingLabels, train_qrels: dict, config: TrainConfig,
                     hard_negatives: bool = True):  # fmt: skip
    """Rows (anchor, positive[, negative_1..n]) from notebook 02's hard negatives when `hard_negatives` (and they
    exist), else pairs from the train labels plus notebook 01's synthetic queries. Dev queries never enter
    training."""
    from datasets import Dataset, DatasetDict

    negatives_file = RunDir(config.run_dir).hard_negatives
    if hard_negatives and negatives_file.exists():
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

    from .evaluate import dev_corpus

    return InformationRetrievalEvaluator(
        {q: queries[q] for q in dev_qrels},
        dev_corpus(data, dev_qrels, config.eval_corpus_size, config.seed, config.doc_template),
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


def total_steps(sets: list, config: TrainConfig) -> int:
    """Optimiser steps the schedule takes: max_steps, else epochs over the batches of each training set."""
    import math

    if config.max_steps > 0:
        return config.max_steps
    return math.ceil(config.epochs * sum(math.ceil(len(d) / config.batch_size) for d in sets))


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


@dataclass
class Training:
    """What `build_trainer` sets up and `save_outputs` needs."""

    config: TrainConfig
    trainer: object  # a SentenceTransformerTrainer
    plan: Plan
    made_from: dict  # the checkpoints' manifest
    data: BeirData
    queries: dict[str, str]  # labelled and synthetic query texts
    dev_qrels: dict
    prompt: str  # the query prompt training used, saved with the model
    n_train_rows: int
    n_dev_queries: int
    labelled: bool  # human training labels (not synthetic queries only)


def build_trainer(config: TrainConfig, callbacks: list | None = None) -> Training:
    """Data, model, loss, dev evaluator and the sentence-transformers Trainer, ready to `train()`.
    `callbacks`: extra transformers TrainerCallbacks (logging to your tracker, timing steps)."""
    from datasets import DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.training_args import BatchSamplers
    from transformers import set_seed

    from .models import resolve

    check_outputs(config.run_dir, base_model=resolve(config.base_model), data_dir=config.data_dir)
    set_seed(config.seed)  # before the model is built: LoRA's initial weights are drawn then
    data = load_beir(config.data_dir, limits="off", run_dir=config.run_dir)
    labels = training_labels(data, config.run_dir, config.split_overlap)
    train_qrels, dev_qrels = split_train_dev(data, labels, config.seed, config.dev_fraction)
    run = RunDir(config.run_dir)
    read = inputs(config, labels)
    made_from = make_manifest(read, {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_SHAPING})
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a DDP run looks after the run directory
        run.reusable("checkpoints", made_from, config.reuse, [run.checkpoints])  # stale checkpoints are not resumed
        run.record("checkpoints", made_from)
    dataset = training_dataset(data, labels, train_qrels, config, read["hard_negatives"] is not None)
    config = fit_memory(config, dataset)
    model, how = load_for_training(config)
    print(how, flush=True)
    prompt = query_prompt(model, config.instruction)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by torchrun / accelerate launch
    loss = build_loss(config.loss, model, config.temperature, config.matryoshka_dims, config.mini_batch_size,
                      gather_across_devices=distributed)  # fmt: skip
    if config.loss == "triplet" and isinstance(dataset, DatasetDict):
        dataset = dataset["hard_negatives"]  # the triplet loss needs a negative in every row
    sets = list(dataset.values()) if isinstance(dataset, DatasetDict) else [dataset]
    if config.loss == "triplet" and "negative_1" not in sets[0].column_names:
        raise ValueError("the triplet loss needs hard negatives: run notebook 02 first, or pick loss='qwen3'")
    evaluator = dev_evaluator(data, labels.queries, dev_qrels, config, prompt) if dev_qrels else None
    every = config.eval_steps or max(1, total_steps(sets, config) // 5)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(RunDir(config.run_dir).checkpoints),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate or (5e-5 if how.full_finetune else 2e-4),
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of all steps
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate in the batch would be its own false negative
        prompts={"anchor": prompt} if prompt else None,
        eval_strategy="steps" if evaluator else "no",
        eval_steps=every,
        eval_on_start=evaluator is not None,  # the base model's dev score, the curve's starting point
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        # the best dev checkpoint is kept (and never rotated away) but not loaded blindly: `choose_checkpoint`
        load_best_model_at_end=False,
        metric_for_best_model="eval_dev_cosine_ndcg@10" if evaluator else None,
        greater_is_better=True,
        logging_steps=max(1, every // 5),
        seed=config.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPUs real DDP (gloo)
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        **how.trainer_args(),
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss, evaluator=evaluator,
                                         callbacks=[_final_step_callback(), *(callbacks or [])])  # fmt: skip
    return Training(config, trainer, how, made_from, data, labels.queries, dev_qrels, prompt,
                    sum(len(d) for d in sets), len(dev_qrels), bool(labels.labelled))  # fmt: skip


def save_outputs(training: Training, seconds: float) -> dict:
    """The log, the adapter (LoRA), the merged model, its slerp with the base when asked, the plot."""
    from .merge import merge_adapter, slerp_models
    from .models import resolve

    config, trainer = training.config, training.trainer
    run = RunDir(config.run_dir)
    log = {
        "backend": str(training.plan),
        "config": dataclasses.asdict(config),
        "loss": trainer.loss.get_config_dict() if hasattr(trainer.loss, "get_config_dict") else {},
        "n_train_rows": training.n_train_rows,
        "world_size": trainer.args.world_size,
        "n_dev_queries": training.n_dev_queries,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        # one point per step: a resumed run evaluates again at the step it resumed from
        "eval_curve": [{"step": step, "ndcg@10": value} for step, value in {
            h["step"]: h["eval_dev_cosine_ndcg@10"] for h in trainer.state.log_history
            if "eval_dev_cosine_ndcg@10" in h}.items()],  # fmt: skip
    }
    if not trainer.is_world_process_zero():
        return log
    run.forget("model")  # until the new outputs are complete, nothing claims to be current
    model = trainer.model
    model.prompts = {**model.prompts, "query": training.prompt, "document": model.prompts.get("document", "")}
    checkpoint = choose_checkpoint(training)
    print(checkpoint.reason, flush=True)
    log.update(checkpoint=checkpoint.chosen, checkpoint_curve=checkpoint.curve, checkpoint_why=checkpoint.reason)
    with replace_dir(run.finetuned if training.plan.full_finetune else run.adapter) as tmp:
        model.save(str(tmp))
    del model
    release_trained(trainer)  # what follows loads whole 16-bit models: the memory plan counts on this
    if not training.plan.full_finetune:
        dtype = None if config.merge_dtype == "auto" else getattr(torch, config.merge_dtype)
        merge_adapter(config.base_model, run.adapter, run.finetuned, dtype)
    base = resolve(config.base_model)
    t, curve, why = choose_merge(training, base, run.finetuned)
    print(why, flush=True)
    slerp_models(base, run.finetuned, t, run.model)
    log.update(merge_curve=curve, merge_why=why)
    log["merge_with_base"] = t
    log["finetuned_model"] = str(run.finetuned)
    write_json(run.train_log, log)
    plot_training(log, run.root / "train_loss.png")
    plot_merge(log, run.root / "merge.png")
    made = {**training.made_from, "params": {**training.made_from["params"], "merge_with_base": t,
                                             "merge_dtype": config.merge_dtype}}  # fmt: skip
    run.record("model", made)
    return log


def release_trained(trainer) -> None:
    """Drop every reference the trainer holds to the trained model and its optimizer (the loss wraps the model,
    the collator and the evaluator hold its methods, the dataloaders the collator, accelerate keeps its own list)
    and return the memory, so that the merge and the slerp candidates after training find it free."""
    import gc

    trainer.model = trainer.model_wrapped = trainer.loss = trainer.optimizer = trainer.lr_scheduler = None
    trainer.data_collator = trainer.evaluator = trainer._train_dataloader = None  # its tokenizer, similarity
    handler = trainer.callback_handler
    handler.model = handler.optimizer = handler.lr_scheduler = handler.train_dataloader = handler.eval_dataloader = None
    trainer.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def restore_checkpoint(model, checkpoint: str | Path) -> None:
    """Load a checkpoint's trained weights into `model` in place, explicitly: a LoRA checkpoint's adapter tensors
    (a 4-bit base stays as it is), else the whole model's. sentence-transformers' own best-model reload rebuilds
    the whole model and, on a 4-bit base, fails and only logs it. Raises, naming the checkpoint, unless every
    tensor landed exactly."""
    from safetensors.torch import load_file

    adapter = Path(checkpoint) / "adapter_model.safetensors"
    if not adapter.exists():
        model.load_state_dict(type(model)(str(checkpoint), device=str(model.device)).state_dict())
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = load_file(adapter)
    set_peft_model_state_dict(model[0].auto_model, saved)
    # the file names tensors as a PeftModel does ("base_model.model." first); a model holding an adapter, not
    # wrapped in a PeftModel, names them without it
    saved, now = ({k.removeprefix("base_model.model."): v for k, v in d.items()}
                  for d in (saved, get_peft_model_state_dict(model[0].auto_model)))  # fmt: skip
    wrong = sorted(set(saved) ^ set(now))
    wrong = wrong or [k for k in saved if not torch.equal(now[k].detach().cpu(), saved[k].to(now[k].dtype))]
    if wrong:
        raise RuntimeError(f"{adapter}: {len(wrong)} adapter tensors did not load into the model (first: {wrong[0]})")


def choose_checkpoint(training: Training):
    """The model as trained at the end ships, unless the best dev checkpoint beats it clearly on the dev queries
    (`evaluate.choose_on_dev`, question b): the Trainer's "best" is the maximum of a few noisy dev scores. The
    model is left holding the chosen weights. Returns the `evaluate.Choice`."""
    from .evaluate import Choice, choose_on_dev, dense_ndcg, dev_corpus

    config, trainer = training.config, training.trainer
    best, last = trainer.state.best_model_checkpoint, last_complete_checkpoint(RunDir(config.run_dir).checkpoints)
    if not best or not last or Path(best).name == Path(last).name:
        why = "no dev queries" if not training.dev_qrels else "the end is the best dev checkpoint"
        return Choice("end", [], "default", f"checkpoint: the end of training ({why})")
    docs = dev_corpus(training.data, training.dev_qrels, config.eval_corpus_size, config.seed, config.doc_template)
    step = f"step {Path(best).name.rsplit('-', 1)[1]}"
    per = {"end": dense_ndcg(trainer.model, training.queries, training.dev_qrels, docs)}
    restore_checkpoint(trainer.model, best)
    per[step] = dense_ndcg(trainer.model, training.queries, training.dev_qrels, docs)
    choice = choose_on_dev(per, "checkpoint", default="end")
    if choice.chosen == "end":
        restore_checkpoint(trainer.model, last)
    choice.reason = f"checkpoint: {choice.reason}"
    return choice


def choose_merge(training: Training, base: str, finetuned) -> tuple[float, list[dict], str]:
    """(t, the dev curve over the grid, one line saying why): the slerp of the base (t = 0) and the trained model
    (t = 1, the default) that ships, chosen on the dev queries by `evaluate.choose_on_dev`, never on test. The
    data's own dev split (labelled or judged queries) decides also when training had synthetic queries alone; a dev
    split cut from synthetic queries does not (it cannot see drift toward the generator), so t = 0.5 then."""
    import gc
    import tempfile

    from .evaluate import choose_on_dev, dense_ndcg, dev_corpus
    from .merge import slerp_models
    from .models import load_embedder

    config = training.config
    forced = config.merge_with_base != "auto"
    if forced and not 0 <= float(config.merge_with_base) <= 1:
        raise ValueError(f"merge_with_base must be 'auto' or between 0 (the base) and 1 (as trained), not "
                         f"{config.merge_with_base!r}")  # fmt: skip
    if forced:
        return float(config.merge_with_base), [], f"model/: slerp at t = {config.merge_with_base} (merge_with_base)"
    if not training.labelled and "dev" not in training.data.qrels:
        return 0.5, [], ("model/: half-way between the base and the trained model (t = 0.5): trained on synthetic "
                         "queries alone, with no judged dev queries to see drift toward the generator's habits "
                         "(judge some: qrels/dev.tsv)")  # fmt: skip
    if not training.dev_qrels:
        return 1.0, [], "model/: as trained (t = 1): no dev queries to choose a merge on"
    docs = dev_corpus(training.data, training.dev_qrels, config.eval_corpus_size, config.seed, config.doc_template)
    # On a GPU in its 16-bit precision: fp16 below compute capability 8.0, where bf16 is only emulated (a T4)
    kwargs = {"model_kwargs": {"dtype": compute_dtype(training.plan)}} if training.plan.precision != "fp32" else {}
    per = {}
    with tempfile.TemporaryDirectory(dir=Path(config.run_dir)) as tmp:
        for t in sorted({0.0, 1.0, *config.merge_grid}):  # the base and the trained model always among them
            model = load_embedder(str(slerp_models(base, finetuned, t, Path(tmp) / "candidate")), **kwargs)
            per[t] = dense_ndcg(model, training.queries, training.dev_qrels, docs)
            del model  # one candidate in memory at a time
            gc.collect()
    choice = choose_on_dev(per, "t", default=1.0, base=0.0)
    if choice.chosen == 0.0:
        what = "model/ is the base model (t = 0.0); the trained model is in finetuned/"
    else:
        what = "model/: as trained (t = 1.0)" if choice.chosen == 1.0 else f"model/: slerp at t = {choice.chosen}"
    return choice.chosen, choice.curve, f"{what}: {choice.reason}"


def train(config: TrainConfig, callbacks: list | None = None) -> dict:
    """Train, choose the checkpoint, save adapter and merged model; returns the training log."""
    training = build_trainer(config, callbacks)
    resume = last_complete_checkpoint(RunDir(config.run_dir).checkpoints)
    if resume:
        print(f"resuming from {resume}", flush=True)
    start = time.perf_counter()
    training.trainer.train(resume_from_checkpoint=resume)
    return save_outputs(training, time.perf_counter() - start)


def plot_training(log: dict, path=None):
    """Training loss and dev NDCG@10 against step; saved as PNG when `path` is given. Returns the figure (a
    bare matplotlib Figure, so the library never changes the notebook's plotting backend)."""
    from matplotlib.figure import Figure

    from .files import atomic_path

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot([p["step"] for p in log["loss_curve"]], [p["loss"] for p in log["loss_curve"]], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if log["eval_curve"]:
        dev = ax.twinx()
        dev.plot([p["step"] for p in log["eval_curve"]], [p["ndcg@10"] for p in log["eval_curve"]], "o-",
                 color="tab:orange", label="dev NDCG@10")  # fmt: skip
        dev.set_ylabel("dev NDCG@10")
        dev.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    return fig


def plot_merge(log: dict, path=None):
    """Dev NDCG@10 (± its standard error) of the slerp of the base (t = 0) and the trained model (t = 1) at each t
    of the grid, the shipped t marked; None when no grid was scored."""
    from matplotlib.figure import Figure

    from .files import atomic_path

    curve = log.get("merge_curve")
    if not curve:
        return None
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.errorbar([p["t"] for p in curve], [p["ndcg@10"] for p in curve], yerr=[p["se"] for p in curve], marker="o",
                capsize=3)  # fmt: skip
    shipped = log["merge_with_base"]
    ax.axvline(shipped, color="k", linestyle="--", linewidth=1, label=f"shipped: t = {shipped}")
    ax.set_xlabel("t (0: base, 1: as trained)")
    ax.set_ylabel("dev NDCG@10")
    ax.legend()
    fig.tight_layout()
    if path is not None:
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
            try:
                values[f.name] = json.loads(values[f.name])
            except json.JSONDecodeError:  # a word where a number may also go, e.g. --merge_with_base auto
                pass
    return TrainConfig(**values)


if __name__ == "__main__":
    from .config import OptionError

    try:
        config = parse_args(sys.argv[1:])
    except OptionError as e:
        sys.exit(f"error: {e}")
    train(config)
