"""The goals the suite is measured against, and where the saved benchmark results put us; rewrites the `goals`
section of docs/BENCHMARKS.md from docs/benchmarks/*.json (run last by `make bench`; it measures nothing).

    python bench/goals.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DOCS, markdown_table, save_results  # noqa: E402

NOT_YET = "not measured yet: no GPU has been lent to this project's sessions (bench/gpu_check.sh is ready)"


def saved(name: str) -> dict | None:
    path = DOCS / "benchmarks" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def gpu_row(size: str, budget_gb: float) -> str:
    table = DOCS / "benchmarks" / "gpu_check.md"
    if not table.exists() or "dry run" in table.read_text(encoding="utf-8").splitlines()[0]:
        return NOT_YET
    for line in table.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 4 and cells[0].startswith(size) and cells[1] == "4-bit QLoRA" and cells[2] == "cached_qwen3":
            try:
                vram = float(cells[4])
            except ValueError:
                return f"failed: {cells[-1]}"
            return f"{vram} GB peak ({'met' if vram <= budget_gb else 'NOT met'})"
    return NOT_YET


def speed_row() -> str:
    results = saved("throughput")
    if not results:
        return "not measured yet: run bench/throughput.py"
    parts, verdicts = [], []
    for model in dict.fromkeys(r["model"] for r in results["training"]):
        rows = {r["system"]: r for r in results["training"] if r["model"] == model}
        ours, control = rows["ours (MNRL)"], rows["plain ST again (A/A)"]
        # The A/A runs are identical, so their largest deviation from 1.0, either way, is this machine's noise.
        noise = max(abs(1 - control["ratio_min"]), abs(1 - control["ratio_max"]))
        parts.append(f"{model} {ours['ratio']:.3f} (A/A noise ±{noise:.3f})")
        verdicts.append("met" if ours["ratio"] >= 1.0 else "within noise" if ours["ratio"] >= 1 - noise else "NOT met")
    if "NOT met" in verdicts:
        verdict = "NOT met"
    elif "within noise" in verdicts:
        verdict = "below 1.0 by less than the A/A noise of this machine: no measurable cost"
    else:
        verdict = "met"
    return f"CPU, same loss, ratio {'; '.join(parts)}: {verdict}; GPU: {NOT_YET.split(':', 1)[1].strip()}"


def main():
    rows = [
        {"goal": "QLoRA of the Qwen3-Embedding-0.6B architecture, batch 32 × 512, fits in 8 GB of VRAM",
         "where we stand": gpu_row("0.6B", 8)},
        {"goal": "QLoRA of the 4B architecture, batch 32 × 512, fits in 16 GB (a T4)",
         "where we stand": gpu_row("4B", 16)},
        {"goal": "our training path at least as fast as plain sentence-transformers (+ peft) on the same hardware",
         "where we stand": speed_row()},
        {"goal": "beat unsloth's own notebook recipe (the reference on a GPU)", "where we stand": NOT_YET},
    ]  # fmt: skip
    section = (
        "## Goals and where we stand\n\n"
        "`bench/goals.py` reads the saved results; rerun `make bench` (and `bench/gpu_check.sh` on a GPU) to "
        "update.\n\n" + markdown_table(rows, ["goal", "where we stand"])
    )
    save_results("goals", {"rows": rows}, section)


if __name__ == "__main__":
    main()
