"""The goals the suite is measured against, and where the saved benchmark results put us; rewrites the `goals`
section of docs/BENCHMARKS.md from docs/benchmarks/*.json (run last by `make bench`; it measures nothing).

    python bench/goals.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, save_results, saved  # noqa: E402

NOT_YET = "not measured yet: no GPU has been lent to this project's sessions (bench/gpu_check.sh is ready)"


def gpu_rows() -> dict[str, dict] | None:
    """The GPU check's rows by name (docs/benchmarks/gpu_check.json, as a run on a GPU leaves it), or None."""
    results = saved("gpu_check")
    if not results or results["device"].startswith("dry run"):
        return None
    return {r["row"]: r for r in results["rows"]}


def vram_row(size: str, budget_gb: float) -> str:
    rows = gpu_rows()
    if rows is None:
        return NOT_YET
    found = [r for name, r in rows.items() if name.startswith(f"train:{size}:unsloth:4bit:")]
    if not found or found[0].get("peak_vram_gb") is None:
        return f"failed: {found[0]['result'] if found else 'no row'}"
    vram = found[0]["peak_vram_gb"]
    return f"{vram} GB peak on {saved('gpu_check')['device']} ({'met' if vram <= budget_gb else 'NOT met'})"


def unsloth_row() -> str:
    """unsloth against sentence-transformers + peft, both 4-bit QLoRA of the 0.6B architecture, same steps."""
    rows = gpu_rows()
    if rows is None:
        return NOT_YET
    fast, plain = rows.get("train:0.6B:unsloth:4bit:qwen3", {}), rows.get("train:0.6B:peft:4bit:qwen3", {})
    if not fast.get("tokens_per_s") or not plain.get("tokens_per_s"):
        return f"failed: {fast.get('result') or plain.get('result')}"
    ratio = fast["tokens_per_s"] / plain["tokens_per_s"]
    same = abs(fast["loss"] - plain["loss"]) <= 1e-2
    return (f"{ratio:.2f} x tokens/s ({'met' if ratio >= 1.8 else 'NOT met'}); loss after the same steps "
            f"{fast['loss']} against {plain['loss']} ({'equal to 1e-2' if same else 'NOT equal'})")


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


def never_worse_row() -> str:
    """The shipped model (our default recipe, notebook 02's negatives where measured) against the base, test split."""
    results = saved("train_quality")
    if not results:
        return "not measured yet: run bench/train_quality.py"
    parts, met = [], True
    for dataset in dict.fromkeys(r["dataset"] for r in results["rows"]):
        rows = {r["system"]: r for r in results["rows"] if r["dataset"] == dataset}
        ours = rows.get("ours+mined") or rows.get("ours")
        if ours and "base" in rows:
            met &= ours["ndcg@10"] >= rows["base"]["ndcg@10"]
            when = ours.get("measured", results["date"])  # rows carried over keep the date they were measured on
            parts.append(f"{dataset} {ours['ndcg@10']:.4f} against {rows['base']['ndcg@10']:.4f} ({when})")
    return f"NDCG@10 shipped against base: {'; '.join(parts)} ({'met' if met else 'NOT met'})"


def fused_row() -> str:
    results = saved("rerank")
    if not results:
        return "not measured yet: run bench/rerank.py"
    dense = next(r for r in results["rows"] if r["system"].startswith("dense ("))["ndcg@10"]
    fused = [r for r in results["rows"] if r["system"].endswith("fused")]
    if not fused:
        return "not measured yet: rerun bench/rerank.py (fused rows)"
    worst = min(r["ndcg@10"] for r in fused)
    listed = ", ".join(f"{r['system']} {r['ndcg@10']:.4f} (weight {r['weight']})" for r in fused)
    return f"dense {dense:.4f}; {listed} ({'met' if worst >= dense else 'NOT met'})"


def code_row() -> str:
    results = saved("code_corpus")
    if not results:
        return "not measured yet: run bench/code_corpus.py"
    rows = {r["key"]: r for r in results["rows"]}
    base = rows["base"]["ndcg@10"]
    gains = {k: r["ndcg@10"] - base for k, r in rows.items() if k != "base" and "ndcg@10" in r}
    listed = ", ".join(f"{k} {g:+.4f} (as trained {rows[k]['ndcg@10 as trained'] - base:+.4f}; dev "
                       f"{rows[k]['dev: trained against base']})" for k, g in gains.items())  # fmt: skip
    met = gains and min(gains.values()) >= 0 and max(gains.values()) >= 0.02
    return f"{listed} ({'met' if met else 'NOT met'})"


def memory_row() -> str:
    """The memory plan at Qwen3-Embedding-0.6B's shape on a CPU: the planned default within 10 GB, and the estimate
    within 25 % of the measured peak at every setting."""
    results = saved("memory_plan")
    if not results:
        return "not measured yet: run bench/memory_plan.py"
    rows = results["rows"]
    planned = next((r for r in rows if r["setting"].startswith("planned")), None)
    errors = {r["setting"]: r["estimate_gb"] / r["measured_gb"] - 1 for r in rows}
    fits = planned is not None and planned["time_max_rss_mb"] * 2**20 / 1e9 <= 10
    listed = ", ".join(f"{name} {e:+.0%}" for name, e in errors.items())
    peak = f"planned default {planned['time_max_rss_mb'] * 2**20 / 1e9:.2f} GB peak" if planned else "no planned row"
    met = fits and all(abs(e) <= 0.25 for e in errors.values())
    return f"{results['layers']} layers: {peak}; estimate against measured: {listed} ({'met' if met else 'NOT met'})"


def decoder_row() -> str:
    """SmolLM2-135M-Instruct made a last-token embedder, trained with LoRA and 4-bit QLoRA on SciFact."""
    results = saved("decoder_lora")
    rows = (results or {}).get("rows", {})
    if not all(k in rows for k in ("base", "lora", "qlora")):
        return "not measured yet: run bench/decoder_lora.py"
    test = results["significance"]
    lifts = {k: test[k]["ndcg@10"] for k in ("lora", "qlora")}
    gap = rows["qlora"]["ndcg@10"] - rows["lora"]["ndcg@10"]
    met = all(t["delta"] >= 0.05 and t["p_value"] < 0.05 for t in lifts.values()) and abs(gap) <= 0.01
    listed = ", ".join(f"{k} {rows[k]['ndcg@10']:.4f} ({t['delta']:+.4f}, p {t['p_value']:.0e})"
                       for k, t in lifts.items())  # fmt: skip
    return (f"base {rows['base']['ndcg@10']:.4f}; {listed}; 4-bit against bf16 {gap:+.4f} "
            f"({'met' if met else 'NOT met'})")


def decisions_row() -> str:
    """Issue 29's bar: what ships by today's rule on SciFact at least 0.724 (shipped before it), on WikiQA at least
    the base; the rule before it beside."""
    results = saved("dev_decisions")
    rows = {(r["dataset"], r["system"]): r["test_ndcg@10"] for r in (results or {}).get("rows", [])}
    if not all((d, s) in rows for d in ("scifact", "wikiqa") for s in ("base", "old rule", "new rule")):
        return "not measured yet: run bench/dev_decisions.py"
    bars = {"scifact": 0.724, "wikiqa": rows[("wikiqa", "base")]}
    listed = ", ".join(f"{d} {rows[(d, 'new rule')]:.4f} (bar {bar:.4f}; old rule {rows[(d, 'old rule')]:.4f})"
                       for d, bar in bars.items())  # fmt: skip
    met = all(rows[(d, "new rule")] >= bar for d, bar in bars.items())
    return f"{listed} ({'met' if met else 'NOT met'})"


def export_row() -> str:
    results = saved("export")
    if not results:
        return "not measured yet: run bench/export.py"
    # the opt-in dynamic int8 (int8 arithmetic) is meant to trade exactness for speed: shown, not held to the goal
    checked = [r for r in results["rows"] if "passed" in r]
    failed = [f"{r.get('model', '')} {r['system']}".strip() for r in checked
              if not r["passed"] and not r["system"].endswith("dynamic")]  # fmt: skip
    listed = ", ".join(f"{r.get('model', '')} {r['system']} min cos {r.get('min_cos', 'none: error')}".strip()
                       for r in checked)  # fmt: skip
    return f"{listed} ({'met' if not failed else 'NOT met: ' + ', '.join(failed)})"


def main():
    rows = [
        {"goal": "QLoRA of the Qwen3-Embedding-0.6B architecture, batch 32 × 512, fits in 8 GB of VRAM",
         "where we stand": vram_row("0.6B", 8)},
        {"goal": "QLoRA of the 4B architecture, batch 32 × 512, fits in 16 GB (a T4)",
         "where we stand": vram_row("4B", 16)},
        {"goal": "unsloth trains at least 1.8 x the tokens/s of sentence-transformers + peft, to the same loss",
         "where we stand": unsloth_row()},
        {"goal": "our training path at least as fast as plain sentence-transformers (+ peft) on the same hardware",
         "where we stand": speed_row()},
        {"goal": "beat unsloth's own notebook recipe (the reference on a GPU)", "where we stand": NOT_YET},
        {"goal": "never worse than the base: the shipped model >= the base on test (MiniLM, SciFact and WikiQA)",
         "where we stand": never_worse_row()},
        {"goal": "choices on dev do not chase noise: what ships on test >= 0.724 on SciFact, >= the base on WikiQA "
                 "(MiniLM, mined negatives)", "where we stand": decisions_row()},
        {"goal": "a reranker never makes things worse: every fused two-stage system >= dense (SciFact)",
         "where we stand": fused_row()},
        {"goal": "corpus-only on source code (100 judged dev queries, no train labels): shipped - base >= 0 NDCG@10 "
                 "for every generator, >= +0.02 for the best",
         "where we stand": code_row()},
        {"goal": "served = trained: every default export passes the parity check, read as served (MiniLM and a "
                 "last-token SmolLM2 embedder fine-tuned on SciFact)",
         "where we stand": export_row()},
        {"goal": "memory plan (Qwen3-Embedding-0.6B shape, CPU): the default run within 10 GB, every estimate within "
                 "25 % of the measured peak", "where we stand": memory_row()},
        {"goal": "the LoRA route lifts a real decoder (SmolLM2-135M on SciFact): NDCG@10 +0.05 or more at p < 0.05, "
                 "4-bit within 0.01 of bf16", "where we stand": decoder_row()},
    ]  # fmt: skip
    section = (
        "## Goals and where we stand\n\n"
        "`bench/goals.py` reads the saved results; rerun `make bench` (and `bench/gpu_check.sh` on a GPU) to "
        "update.\n\n" + markdown_table(rows, ["goal", "where we stand"])
    )
    save_results("goals", {"rows": rows}, section)


if __name__ == "__main__":
    main()
