"""The memory plan against measured memory: a model of Qwen3-Embedding-0.6B's exact architecture (random bf16
weights, as the real checkpoint's dtype; a sentence-transformers folder with last-token pooling and Qwen's query
prompt) trained by `embtune.train.train` on `data_samples/pydocs` with `make run-all`'s defaults (batch 32, at most
512 tokens, LoRA r=16 on every projection, the Qwen3 loss), each setting in its own process under `/usr/bin/time -v`:
the planned default run 3 optimiser steps, the settings it is compared with `--steps` (3 unless told; the peak is
reached in the first step, when the optimiser's state is allocated, so one step measures it on a slow machine).

For each setting: `embtune.memory.estimate` (from the config and the data's own lengths, before any weight is
loaded), the process's peak resident memory (VmHWM; /usr/bin/time's maximum RSS agrees), and seconds per optimiser
step (a TrainerCallback). Rows without the dev evaluation stop right after their last step; the planned default run
goes on through train()'s final dev evaluation, the adapter's save and the merge. Then what `make run-all`'s
training costs on this machine: seconds per step x the steps of 3 epochs on pydocs, plus the evaluation.

    OMP_NUM_THREADS=2 python bench/memory_plan.py [--layers 28] [--folder /tmp/q06] [--settings NAME ...] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULT, ROOT, markdown_table, report, save_results  # noqa: E402
from merge_memory import QWEN3_06B, status_mb  # noqa: E402

DATA = str(ROOT / "data_samples" / "pydocs")
LIMIT_MB = 12_000  # a process above this is stopped by its own watchdog: the machine is shared
PLAN_BUDGET_GB = 10.0  # the planned default run: a 16 GB laptop's free memory
# name: (TrainConfig overrides, whether the run goes on through evaluation, save and merge)
SETTINGS = {
    "plain, no checkpointing, batch 4": (dict(batch_size=4, gradient_checkpointing=False, loss="qwen3"), False),
    "plain, no checkpointing, batch 2": (dict(batch_size=2, gradient_checkpointing=False, loss="qwen3"), False),
    "plain, checkpointing": (dict(gradient_checkpointing=True, loss="qwen3"), False),
    "cached (mini-batch 8), checkpointing": (
        dict(gradient_checkpointing=True, loss="cached_qwen3", mini_batch_size=8),
        False,
    ),
    "cached (mini-batch 8), no checkpointing": (
        dict(gradient_checkpointing=False, loss="cached_qwen3", mini_batch_size=8),
        False,
    ),
    "planned default (10 GB)": (dict(plan=True), True),
}
# At 28 layers the plan chooses checkpointing with the plain loss; batch 4 without checkpointing is estimated at 12 GB
DEFAULT_SETTINGS = [
    "planned default (10 GB)",
    "plain, no checkpointing, batch 2",
    "cached (mini-batch 8), checkpointing",
]
PLANNED_STEPS = 3


def build(folder: Path, layers: int = 28) -> Path:
    """A sentence-transformers folder of Qwen3-Embedding-0.6B's shape (random bf16 weights, the tiny fixtures'
    tokenizer, which appends <|endoftext|>), built once and reused."""
    st = folder / f"qwen3-0.6b-shape-{layers}-layers"
    if (st / "modules.json").exists():
        return st
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Qwen3Config, Qwen3Model

    from embtune.encode import WEB_SEARCH_TASK, instruct
    from embtune.fixtures import tiny_tokenizer

    torch.manual_seed(0)
    backbone = Qwen3Model(Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": layers})).to(torch.bfloat16)
    with tempfile.TemporaryDirectory(dir=folder) as hf:
        backbone.save_pretrained(hf)
        tokenizer = tiny_tokenizer(append_end=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(hf)
        del backbone
        model = SentenceTransformer(
            modules=[Transformer(hf), Pooling(QWEN3_06B["hidden_size"], "lasttoken"), Normalize()],
            prompts={"query": instruct(WEB_SEARCH_TASK), "document": ""},
            similarity_fn_name="cosine",
            device="cpu",
        )
        model.save(str(st))
    return st


def watchdog(limit_mb: float) -> None:
    """Stop this process before it takes more than `limit_mb` of a shared machine (the OOM killer must not)."""

    def watch():
        while True:
            if status_mb("VmRSS") > limit_mb:
                print(f"watchdog: resident memory above {limit_mb:.0f} MB, stopping", file=sys.stderr, flush=True)
                os._exit(137)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def train_config(path: str, run_dir: str, steps: int = PLANNED_STEPS, **overrides):
    """make run-all's TrainConfig on pydocs, `steps` steps, with the overrides; LoRA as the plan picks for 596M
    parameters (kept for the smaller shapes of a quick check); the dev evaluation over the dev queries' positives
    only and the model as trained (merge_with_base=1), both costed per document instead (see main)."""
    import dataclasses

    from embtune.train import TrainConfig

    values = dict(base_model=path, data_dir=DATA, run_dir=run_dir, max_steps=steps, eval_steps=1000, eval_corpus_size=0,
                  merge_with_base=1.0, full_finetune=False, **overrides)  # fmt: skip
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


def training_rows(config):
    """The training dataset as build_trainer makes it (before the model), for the estimate."""
    from embtune.data import load_beir, split_train_dev, training_labels
    from embtune.train import training_dataset

    data = load_beir(config.data_dir, limits="off")
    labels = training_labels(data, config.run_dir, getattr(config, "split_overlap", "error"))
    train_qrels, _ = split_train_dev(data, labels, config.seed, config.dev_fraction)
    return training_dataset(data, labels, train_qrels, config, False)


def planned(config, path: str, budget_gb: float | None = None):
    """(config, memory plan, estimate) as train.build_trainer would have them with the memory plan wired in:
    the lora plan, the data's lengths, the estimate; with `config.plan`, the memory plan's own choices (loss
    "auto", mini-batch and checkpointing left open) within `budget_gb`."""
    import dataclasses

    from embtune import memory
    from embtune.lora import plan

    how = plan(config, path)
    dataset = training_rows(config)
    resident = status_mb("VmRSS") * 2**20
    shape = memory.ModelShape.from_config(path, n_params=how.n_params)
    runtime = max(resident, memory.RUNTIME_CPU)
    if budget_gb is not None:
        open_config = dataclasses.replace(config, gradient_checkpointing=None, mini_batch_size=None)
        chosen = memory.plan_memory(open_config, path, how, dataset, available=budget_gb * 1e9 - resident,
                                    resident=resident, runtime=runtime, shape=shape, loss="auto")  # fmt: skip
        return chosen.apply(config), chosen, chosen.estimate
    lengths = memory.padded_lengths(path, dataset, config.max_seq_length,
                                    {"anchor": memory.folder_prompt(path, config.instruction)})  # fmt: skip
    setting = memory.setting_for(shape, how, config.batch_size, lengths, config, "cpu")
    setting = dataclasses.replace(
        setting,
        gradient_checkpointing=bool(config.gradient_checkpointing),
        mini_batch_size=config.mini_batch_size if config.loss.startswith("cached_") else None,
    )
    return config, None, memory.estimate(shape, setting, runtime)


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def one(name: str, path: str, run_dir: str, steps: int) -> dict:
    """One setting in this process: the estimate, then `steps` optimiser steps (and, for the planned run, the final dev
    evaluation, save and merge), timed; peak resident memory from /proc/self/status."""
    watchdog(LIMIT_MB)
    import torch
    from transformers import TrainerCallback

    from embtune.train import train

    overrides, full_run = SETTINGS[name]
    overrides = dict(overrides)
    use_plan = overrides.pop("plan", False)
    config = train_config(path, run_dir, PLANNED_STEPS if use_plan else steps, **overrides)
    config, memory_plan, estimate = planned(config, path, PLAN_BUDGET_GB if use_plan else None)
    if memory_plan is not None:
        print(memory_plan, flush=True)
    cached = config.loss.startswith("cached_")
    result = {"setting": name, "batch": config.batch_size, "checkpointing": "on" if config.gradient_checkpointing
              else "off", "loss": config.loss + (f" (mini-batch {config.mini_batch_size})" if cached else ""),
              "estimate_gb": round(estimate.step_total / 1e9, 2), "estimate_run_gb": round(estimate.total / 1e9, 2),
              "estimate_parts_gb": estimate.gb(),
              "rss_before_load_mb": round(status_mb("VmRSS"))}  # fmt: skip
    steps, lengths, marks = [], [], {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            marks["train_begin"] = time.perf_counter()
            result["rss_loaded_mb"] = round(status_mb("VmRSS"))
            model[0].register_forward_pre_hook(lambda m, inputs: lengths.append(list(inputs[0]["input_ids"].shape)))

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            if "first_step" not in marks:  # train() evaluates on dev before the first step (eval_on_start)
                marks["first_step"] = self.start
                result["eval_start_s"] = round(self.start - marks["train_begin"], 1)
                result["peak_before_steps_mb"] = round(status_mb("VmHWM"))
                lengths.clear()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"seconds": round(time.perf_counter() - self.start, 1), "peak_mb": round(status_mb("VmHWM")),
                          "rss_mb": round(status_mb("VmRSS")), "load": load()})  # fmt: skip
            print(f"step {state.global_step}: {steps[-1]}", flush=True)
            if state.global_step >= state.max_steps:
                result["peak_steps_mb"] = round(status_mb("VmHWM"))
                result["batch_shapes"] = list(lengths)
                if not full_run:
                    finish()
                    os._exit(0)

        def on_evaluate(self, args, state, control, **kwargs):
            if state.global_step:
                marks["final_eval_end"] = time.perf_counter()

    def finish():
        result["steps"] = steps
        result["seconds_per_step"] = round(sum(s["seconds"] for s in steps) / len(steps), 1)
        result["peak_mb"] = round(status_mb("VmHWM"))
        result["threads"] = torch.get_num_threads()
        report(result)

    start = time.perf_counter()
    log = train(config, callbacks=[Timer()])
    result["run_seconds"] = round(time.perf_counter() - start, 1)
    result["final_eval_s"] = round(marks["final_eval_end"] - marks["first_step"] - sum(s["seconds"] for s in steps), 1)
    result["save_and_merge_s"] = round(time.perf_counter() - marks["final_eval_end"], 1)
    result["plan"] = str(memory_plan)
    result["backend"] = log["backend"]
    finish()
    return result


def run_setting(name: str, path: Path, steps: int) -> dict:
    """`one` in a fresh interpreter under /usr/bin/time -v: its result, with time's maximum resident set size."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = ["/usr/bin/time", "-v", sys.executable, __file__, "--one", name, str(path), run_dir]
        command += ["--steps", str(steps)]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode or RESULT not in done.stdout:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.rsplit(RESULT, 1)[1].splitlines()[0])
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result["time_max_rss_mb"] = round(int(found.group(1)) / 1024) if found else None
    return result


def default_cost(path: str, seconds_per_step: float, eval_seconds: float) -> dict:
    """What make run-all's training (TrainConfig's defaults on pydocs) costs at the measured speeds: its steps, its dev
    evaluations (before the first step, every `eval_steps`, at the last step, and the five merge candidates of
    merge_with_base="auto"), each over the dev queries and the default dev corpus (scaled by tokens from the
    measured evaluation over the dev positives only), plus the slerps (34 s each, docs/benchmarks/merge_memory.json)."""

    from transformers import AutoTokenizer

    from embtune.data import load_beir, split_train_dev, training_labels
    from embtune.evaluate import dev_corpus
    from embtune.train import TrainConfig

    config = TrainConfig(base_model=path, data_dir=DATA, run_dir=tempfile.mkdtemp())
    rows = training_rows(config)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * math.ceil(len(rows) / 32))
    every = config.eval_steps or max(1, total // 5)
    evals = 1 + total // every + (total % every > 0)  # on start, every `every` steps, and the last step
    grid = len(getattr(config, "merge_grid", [])) if getattr(config, "merge_with_base", None) == "auto" else 0
    data = load_beir(DATA, limits="off")
    labels = training_labels(data, config.run_dir)
    _, dev = split_train_dev(data, labels, config.seed, config.dev_fraction)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokens(texts):
        return sum(min(512, len(ids)) for ids in tokenizer(list(texts))["input_ids"])

    queries = tokens(labels.queries[q] for q in dev)
    measured = queries + tokens(dev_corpus(data, dev, 0, config.seed, config.doc_template).values())
    default = queries + tokens(
        dev_corpus(data, dev, config.eval_corpus_size, config.seed, config.doc_template).values()
    )
    one_eval = eval_seconds * default / measured
    seconds = total * seconds_per_step + (evals + grid) * one_eval + grid * 34 + 14
    return {"rows": len(rows), "steps": total, "evaluations": evals + grid, "eval_s": round(one_eval),
            "hours": round(seconds / 3600, 1)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=3, metavar=("SETTING", "MODEL", "RUN_DIR"))
    parser.add_argument("--layers", type=int, default=28, help="28: Qwen3-Embedding-0.6B; fewer for a quick check")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "embtune-memory-plan"))
    parser.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS)
    parser.add_argument("--steps", type=int, default=PLANNED_STEPS, help="optimiser steps of the compared settings")
    parser.add_argument("--max-estimate-gb", type=float, default=11.0, help="settings estimated above are skipped")
    parser.add_argument("--no-save", action="store_true", help="print, do not write docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.one:
        one(*args.one, args.steps)
        return
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = build(folder, args.layers)
    results = folder / f"results-{args.layers}-layers.json"  # a rerun continues where it stopped
    done = json.loads(results.read_text()) if results.exists() else {}
    for name in args.settings:
        if name in done:
            continue
        config = {**SETTINGS[name][0]}
        if not config.pop("plan", False):
            estimate = planned(train_config(str(path), tempfile.mkdtemp(), **config), str(path))[2]
            if estimate.total / 1e9 > args.max_estimate_gb:
                print(f"skipped {name}: estimated {estimate}", flush=True)
                continue
        row = run_setting(name, path, args.steps)
        measured = row["peak_steps_mb"] * 2**20 / 1e9
        row["measured_gb"] = round(measured, 2)
        row["estimate_error"] = f"{row['estimate_gb'] / measured - 1:+.0%}"
        done[name] = row
        results.write_text(json.dumps(done, indent=1))
        print(json.dumps(row), flush=True)
    rows = [done[n] for n in args.settings if n in done]
    cost, costs = "", {}
    plan_rows = [r for r in rows if r["setting"].startswith("planned")]
    if plan_rows:
        p = plan_rows[0]
        costs = default_cost(str(path), p["seconds_per_step"], (p["eval_start_s"] + p["final_eval_s"]) / 2)
        cost = (f"What `make run-all`'s training costs on this CPU with the plan's settings: "
                f"{p['seconds_per_step']:,.0f} s per optimiser step x {costs['steps']} steps ({costs['rows']} train "
                f"rows, batch 32, 3 epochs), plus {costs['evaluations']} dev evaluations of ~{costs['eval_s']:,} s "
                "each (before the first step, every 5 steps, at the last, and the 5 merge candidates; the dev "
                f"queries against the 639 documents) and the slerps: about {costs['hours']:.0f} hours.")  # fmt: skip
        print(cost, flush=True)
    if args.no_save:
        return
    for r in rows:
        r["time_v_max_rss_gb"] = round(r["time_max_rss_mb"] * 2**20 / 1e9, 2) if r.get("time_max_rss_mb") else ""
        planned_row = r["setting"].startswith("planned")
        n = len(r["steps"])
        r["with"] = f"{n} step{'s' * (n > 1)}" + (", dev evals, save, merge" if planned_row else "")
        r["peak_all_gb"] = round(r["peak_mb"] * 2**20 / 1e9, 2)
        if not planned_row:
            r["estimate_run_gb"] = ""  # the run stopped after its steps: no evaluation or merge to compare with
        r["load"] = max(s["load"] for s in r["steps"])
    table = markdown_table(rows, ["setting", "batch", "checkpointing", "loss", "estimate_gb", "measured_gb",
                                  "estimate_error", "estimate_run_gb", "peak_all_gb", "time_v_max_rss_gb",
                                  "seconds_per_step", "load", "with"])  # fmt: skip
    shape = f"{args.layers} layers" + (", as Qwen3-Embedding-0.6B" if args.layers == 28 else "")
    section = (
        "## Memory plan: estimate against measured peak, Qwen3-Embedding-0.6B architecture on a CPU\n\n"
        f"`bench/memory_plan.py`: random bf16 weights in Qwen3-Embedding-0.6B's architecture ({shape}; hidden 1024, "
        "16/8 heads of 128, intermediate 3072, vocabulary 151,669), loaded in bf16 as the real checkpoint is, LoRA "
        "r=16 on every projection (10M trainable), trained by `embtune.train.train` on `data_samples/pydocs` for the "
        "optimiser steps in `with`, `OMP_NUM_THREADS=2`, each setting in its own process under `/usr/bin/time -v`. "
        "`estimate_gb`: `embtune.memory.estimate`'s training step, before any weight is loaded, at the data's own "
        "padded lengths (the longest batch: anchors with the query prompt, positives capped at 512); `measured_gb`: "
        "the process's peak resident memory (VmHWM) when the last step ends; `estimate_run_gb` against "
        "`peak_all_gb`: the whole run (with the dev evaluations, save and merge; the estimate also counts the "
        "merge grid's candidate model, which this run skips) against the whole process; "
        "`time_v_max_rss_gb`: `/usr/bin/time -v`'s maximum resident set size; GB = 10^9 bytes. The planned default "
        "run is `make run-all`'s TrainConfig with checkpointing, loss and mini-batch left to "
        f"`embtune.memory.plan_memory` within {PLAN_BUDGET_GB:g} GB; it goes on through the final dev evaluation, "
        "the adapter's save and the merge. Every run evaluates on dev before its first step (train()'s "
        "`eval_on_start`), here over the dev queries' positives only (`eval_corpus_size=0`), and ships the model "
        "as trained (`merge_with_base=1`): the default dev corpus and merge grid cost time, not training memory, "
        "and are costed below from the measured evaluation. With the cached loss on a CPU, train() has glibc hand "
        "freed blocks of 1 MiB and more back to the OS (`embtune.memory.return_freed_blocks`): without it the "
        "mini-batches' freed activations stayed resident, and the cached row measured 4.80 GB against 3.50 GB "
        "estimated (-27 %). `load`: the machine's 1-minute load average (2 cores; at 4, other jobs ran beside the "
        "step and took half the machine or more), which slows the seconds per step.\n\n" + table + "\n\n" + cost
    )
    save_results("memory_plan", {"layers": args.layers, "default_cost": costs, "rows": rows}, section)


if __name__ == "__main__":
    main()
