"""What each choice made on dev is worth on test: the checkpoint, the slerp t, and the rule that picks them.

all-MiniLM-L6-v2 trained by `embtune.train` with its defaults on notebook 02's mined negatives (batch 32, at most
256 tokens, on the CPU), once per data set; the run ships `model/` by today's rule (`evaluate.choose_on_dev`: the
model as trained at the end, unless it does not beat the base on dev, or an alternative beats it clearly). From the
same run's kept checkpoints (the end and the best dev step) and their slerps with the base, every candidate is
scored on the dev queries training held out (NDCG@10 ± standard error, the dev corpus training used) and on the
test split:

- `base`; `end` (as trained, t = 1); `best checkpoint` (the Trainer's highest dev score, t = 1);
- `old rule`: the best dev checkpoint, then the slerp t with the highest dev mean, kept when it beats the base in a
  one-sided paired t-test (the rule until 2026-12-05);
- `new rule`: what the run shipped.

    python bench/dev_decisions.py [--datasets scifact wikiqa] [--work DIR]   # DIR is kept: delete it to redo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, markdown_table, minilm_path, save_results, test_scores  # noqa: E402

BATCH, SEQ = 32, 256
GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def trained_run(dataset: str, work: Path) -> Path:
    """The run directory: mined and trained once (a finished run is reused)."""
    from embtune.data import load_beir
    from embtune.mine import MineConfig, mine, save
    from embtune.models import load_embedder
    from embtune.train import TrainConfig, train

    run_dir, data_dir = work / dataset, str(SHARED / dataset)
    if (run_dir / "train_log.json").exists() and (run_dir / "model" / "modules.json").exists():
        return run_dir
    if not (run_dir / "hard_negatives").exists():
        config = MineConfig(data_dir=data_dir, run_dir=str(run_dir), base_model=minilm_path())  # its defaults
        save(*mine(load_embedder(minilm_path(), device="cpu"), minilm_path(), load_beir(data_dir, limits="off"),
                   config), str(run_dir))  # fmt: skip
    train(TrainConfig(base_model=minilm_path(), data_dir=data_dir, run_dir=str(run_dir), batch_size=BATCH,
                      max_seq_length=SEQ))  # fmt: skip
    return run_dir


def old_rule(per: dict[float, dict[str, float]]) -> float:
    """The rule until 2026-12-05: the t with the highest dev mean, kept when it beats t = 0 (one-sided paired
    t-test, p < 0.05), else 0."""
    import numpy as np

    from embtune.evaluate import beats

    ids = sorted(per[0.0])
    scores = {t: np.array([per[t][q] for q in ids]) for t in per}
    best = max(sorted(per), key=lambda t: (scores[t].mean(), -t))
    return best if best != 0.0 and beats(scores[best], scores[0.0]) < 0.05 else 0.0


def one(dataset: str, work: Path) -> list[dict]:
    """The rows of one data set, kept in `work` beside its run (data sets can run in parallel processes, and a
    last call with all of them writes the table)."""
    from embtune.files import write_json

    done = work / f"{dataset}-rows.json"
    if not done.exists():
        write_json(done, measure(dataset, work))
    return json.loads(done.read_text())


def measure(dataset: str, work: Path) -> list[dict]:
    import tempfile

    from embtune.data import load_beir
    from embtune.evaluate import EvalConfig, dense_ndcg, dev_corpus, dev_split, mean_se
    from embtune.merge import slerp_models
    from embtune.models import load_embedder

    run_dir = trained_run(dataset, work)
    log = json.loads((run_dir / "train_log.json").read_text())
    data_dir = str(SHARED / dataset)
    data = load_beir(data_dir, limits="off")
    config = EvalConfig(data_dir=data_dir, run_dir=str(run_dir), base_model=minilm_path())
    queries, dev_qrels = dev_split(data, config)
    docs = dev_corpus(data, dev_qrels, log["config"]["eval_corpus_size"], log["config"]["seed"],
                      log["config"]["doc_template"])  # fmt: skip
    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    end = steps[-1]
    best = int(Path(log["best_checkpoint"]).name.split("-")[1]) if log["best_checkpoint"] else end
    shipped = end if log["checkpoint"] == "end" else int(log["checkpoint"].split()[1])
    scored: dict[tuple, tuple] = {}  # (step, t) -> (dev per query, test scores): one model scored once

    def scores(step: int, t: float, tmp: Path) -> tuple:
        key = (None, 0.0) if t == 0.0 else (step, t)
        if key not in scored:
            checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
            path = minilm_path() if t == 0.0 else str(slerp_models(minilm_path(), checkpoint, t, tmp / f"{step}-{t}"))
            model = load_embedder(path, device="cpu")
            cache = run_dir if t == 0.0 else tmp / f"cache-{step}-{t}"  # the base's corpus is cached by mining
            scored[key] = (dense_ndcg(model, queries, dev_qrels, docs), test_scores(model, path, data_dir, cache))
        return scored[key]

    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        per = {t: scores(best, t, Path(tmp))[0] for t in GRID}
        t_old = old_rule(per)
        for system, step, t in [("base", None, 0.0), ("end", end, 1.0), ("best checkpoint", best, 1.0),
                                ("old rule", best, t_old), ("new rule", shipped, log["merge_with_base"])]:  # fmt: skip
            dev, test = scores(step, t, Path(tmp))
            mean, se = mean_se(dev.values())
            rows.append({"dataset": dataset, "system": system, "checkpoint": "" if t == 0.0 else f"step {step}",
                         "t": t, "dev_ndcg@10": round(mean, 4), "dev_se": round(se, 4),
                         "test_ndcg@10": round(test["ndcg@10"], 4)})  # fmt: skip
            print(rows[-1], flush=True)
    rows[-1]["why"] = f"{log['checkpoint_why']}; {log['merge_why']}"
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["scifact", "wikiqa"])
    parser.add_argument("--work", default="/tmp/embtune-bench-dev", help="where runs are kept between calls")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for d in args.datasets for r in one(d, work)]
    table = markdown_table(rows, ["dataset", "system", "checkpoint", "t", "dev_ndcg@10", "dev_se", "test_ndcg@10"])
    why = "\n".join(f"- {r['dataset']}: {r['why']}" for r in rows if r.get("why"))
    section = (
        "## Decisions on dev: what the checkpoint and slerp choices are worth on test\n\n"
        "`bench/dev_decisions.py`: all-MiniLM-L6-v2 trained by `embtune.train` with its defaults on notebook 02's "
        f"mined negatives (batch {BATCH}, at most {SEQ} tokens, 3 epochs, on the CPU), one run per data set. "
        "Every candidate scored on the dev queries training held out (NDCG@10 ± its standard error, the dev "
        "corpus training used) and on the test split: `end`, the model as trained; `best checkpoint`, the "
        "Trainer's highest dev score; `old rule`, that checkpoint's slerp with the base at the t of the grid "
        "with the highest dev mean, kept when it beats the base (p < 0.05; the rule until 2026-12-05); `new "
        "rule`, what the run shipped (`evaluate.choose_on_dev`: the end, unless it does not beat the base, or an "
        "alternative beats it at p < 0.05 / the number of alternatives). Dev differences within a standard error "
        "or two are noise: test is where they show it.\n\n" + table + "\n\nWhy the runs shipped what they did:\n" + why
    )
    save_results("dev_decisions", {"batch_size": BATCH, "rows": rows}, section)


if __name__ == "__main__":
    main()
