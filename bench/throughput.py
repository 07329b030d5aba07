"""Speed and memory of our training and encoding paths against plain sentence-transformers, on the CPU.

Training: `embtune.train.train` (notebook 03) against the sentence-transformers documentation's recipe, with the
same model, rows (SciFact train pairs, built once by `training_dataset`), loss (MultipleNegativesRankingLoss;
our default Qwen3 loss is timed too), batch, sampler, seed and number of steps. A callback times the optimiser
steps only, the first one left out as warm-up, so loading, evaluation and saving are not counted. Each run is
its own process (peak RSS is its own); runs alternate between the systems and the median is reported.
Both paths run the same Trainer, so their difference is near the noise of this shared 2-core machine: a
second, identical plain run (an A/A control) shows how large that noise is, and each ratio is paired with
the plain run of the same round.
Encoding: `embtune.encode.encode` against `SentenceTransformer.encode` on the same texts, in one process.
Models: the tiny random Qwen3 embedder (last-token pooling) and all-MiniLM-L6-v2.

    python bench/throughput.py [--repeats 4] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, in_own_process, markdown_table, minilm_path, peak_rss_mb, report, save_results  # noqa: E402

BATCH, SEQ, ENCODE_DOCS = 16, 128, 1000
SYSTEMS = {
    "plain ST (MNRL)": "plain",
    "plain ST again (A/A)": "plain",
    "ours (MNRL)": "mnrl",
    "ours (Qwen3 loss)": "qwen3",
}
TRAINING_COLUMNS = ["model", "system", "steps", "rows_per_s", "range", "tokens_per_s", "ratio", "ratio_min",
                    "ratio_max", "peak_rss_mb"]  # fmt: skip
STEPS = {"tiny Qwen3": 60, "MiniLM": 16}  # enough timed steps to average out hiccups (seconds: docs/BENCHMARKS.md)


def model_path(name: str, folder: Path) -> str:
    if name == "MiniLM":
        return minilm_path()
    from embtune.fixtures import write_tiny_qwen3_embedding

    return str(write_tiny_qwen3_embedding(folder / "tiny"))


def step_timer():
    """A callback recording the time at the end of every optimiser step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    return Timer()


def config_for(path: str, run_dir: str, loss: str, steps: int):
    from embtune.train import TrainConfig

    return TrainConfig(
        base_model=path, data_dir=str(SHARED / "scifact"), run_dir=run_dir, loss=loss, batch_size=BATCH,
        max_seq_length=SEQ, max_steps=steps, eval_steps=10**6,
    )  # fmt: skip


def plain_recipe(path: str, dataset, out: str, steps: int, timer) -> None:
    """sentence-transformers as its documentation trains, nothing of ours in the loop."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.base.training_args import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = min(model.max_seq_length or SEQ, SEQ)
    prompt = model.prompts.get("query")  # an instruction model's query prompt, as the documentation shows
    args = Args(
        output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=5e-5, warmup_steps=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", seed=42, use_cpu=True,
        prompts={"anchor": prompt} if prompt else None,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model), callbacks=[timer]
    )
    trainer.train()


def train_once(model_name: str, system: str, steps: int) -> dict:
    from transformers import AutoTokenizer

    from embtune.data import load_beir, split_train_dev, training_labels
    from embtune.train import train, training_dataset

    timer = step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(model_name, Path(tmp))
        config = config_for(path, f"{tmp}/run", "mnrl" if system == "plain" else system, steps)
        data = load_beir(config.data_dir, limits="off")
        labels = training_labels(data, config.run_dir)
        train_qrels, _ = split_train_dev(data, labels, config.seed, config.dev_fraction)
        dataset = training_dataset(data, labels, train_qrels, config)
        if system == "plain":
            plain_recipe(path, dataset, f"{tmp}/plain", steps, timer)
        else:
            train(config, callbacks=[timer])
        tokenizer = AutoTokenizer.from_pretrained(path)
    seconds = timer.times[-1] - timer.times[0]  # steps 2..n: the first one warms up
    rows = (len(timer.times) - 1) * BATCH
    lengths = [
        min(SEQ, len(ids))
        for column in ("anchor", "positive")
        for ids in tokenizer(dataset[column][: rows + BATCH])["input_ids"]
    ]
    tokens_per_row = 2 * statistics.mean(lengths)  # query + document
    return {
        "rows_per_s": rows / seconds,
        "tokens_per_s": rows * tokens_per_row / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def encode_once(model_name: str, repeats: int) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    from embtune.data import load_beir
    from embtune.encode import encode

    texts = list(load_beir(SHARED / "scifact", limits="off").doc_texts().values())[:ENCODE_DOCS]
    with tempfile.TemporaryDirectory() as tmp:
        model = SentenceTransformer(model_path(model_name, Path(tmp)), device="cpu")
        model.max_seq_length = min(model.max_seq_length or SEQ, SEQ)
        runs = {
            "plain ST encode": lambda: model.encode(texts, batch_size=32, convert_to_numpy=True),
            "ours (encode)": lambda: encode(model, texts, batch_size=32, progress=False),
        }
        for run in runs.values():
            run()  # warm-up
        seconds = {name: [] for name in runs}
        for repeat in range(repeats):
            for name, run in list(runs.items())[:: 1 if repeat % 2 else -1]:
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    return [{"system": name, "docs_per_s": len(texts) / statistics.median(s)} for name, s in seconds.items()]


def with_ratio(rows: list[dict], key: str) -> list[dict]:
    reference = rows[0][key]
    return [{**r, "ratio": r[key] / reference} for r in rows]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, help="optimiser steps per run (default: per model, see STEPS)")
    parser.add_argument("--models", nargs="+", default=["tiny Qwen3", "MiniLM"])
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SYSTEM"))
    args = parser.parse_args()
    if args.one:
        report(train_once(*args.one, args.steps or STEPS[args.one[0]]))
        return
    training, encoding = [], []
    for model in args.models:
        steps = args.steps or STEPS[model]
        runs = {name: [] for name in SYSTEMS}
        for repeat in range(args.repeats):
            names = list(SYSTEMS)[repeat % len(SYSTEMS) :] + list(SYSTEMS)[: repeat % len(SYSTEMS)]
            for name in names:  # each system goes first once: a drift of the machine favours none
                runs[name].append(in_own_process(__file__, model, SYSTEMS[name], "--steps", str(steps)))
                print(model, name, runs[name][-1], flush=True)
        reference = [r["rows_per_s"] for r in runs[next(iter(SYSTEMS))]]
        for name, rs in runs.items():
            ratios = [r["rows_per_s"] / ref for r, ref in zip(rs, reference, strict=True)]  # paired with the same round
            training.append(
                {"model": model, "system": name, "steps": steps,
                 **{k: statistics.median(r[k] for r in rs) for k in rs[0]},
                 "range": f"{min(r['rows_per_s'] for r in rs):.1f}–{max(r['rows_per_s'] for r in rs):.1f}",
                 "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
            )  # fmt: skip
        encoding += [{"model": model, **r} for r in with_ratio(encode_once(model, args.repeats), "docs_per_s")]
        print(encoding[-2:], flush=True)
    results = {"rounds": args.repeats, "batch": BATCH, "max_seq_length": SEQ, "training": training,
               "encoding": encoding}  # fmt: skip
    save_results("throughput", results, section(results))


def section(results: dict) -> str:
    """The docs/BENCHMARKS.md section of the saved results."""
    rounds = results["rounds"]
    return (
        "## Training and encoding speed against plain sentence-transformers\n\n"
        f"`bench/throughput.py`: `steps` optimiser steps at batch {BATCH} × at most {SEQ} tokens on SciFact "
        "train pairs, the first step left out as warm-up; full fine-tuning (both models are under 300M "
        f"parameters); median of {rounds} rounds (range: slowest–fastest), each run in its own process, "
        "each system first in one round. The ratio is against the plain sentence-transformers run of the same "
        "round, median, minimum and maximum over the rounds (≥ 1.0: our path costs no speed). The A/A row runs "
        "plain sentence-transformers a second time: its largest deviation from 1.0 is the noise of this "
        "machine.\n\n"
        + markdown_table(results["training"], TRAINING_COLUMNS)
        + f"\n\nEncoding {ENCODE_DOCS:,} SciFact documents, batch 32, median of {rounds} in one process:\n\n"
        + markdown_table(results["encoding"], ["model", "system", "docs_per_s", "ratio"])
    )


if __name__ == "__main__":
    main()
