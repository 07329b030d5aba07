"""Real papermill runs of the notebooks on the tiny fixtures, asserting on what they write."""

import json
import os
import subprocess
import sys

import nbformat
import papermill as pm
import pytest

from conftest import ROOT, SAMPLES, SHARED
from embtune.evaluate import HEADLINE, METRICS
from embtune.run_all import notebooks

NOTEBOOKS = notebooks()


def test_notebooks_are_numbered_clean_and_parameterised():
    assert [p.name[:2] for p in NOTEBOOKS] == sorted(p.name[:2] for p in NOTEBOOKS) and NOTEBOOKS
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), path.name
        declared = pm.inspect_notebook(str(path))
        assert {"data_dir", "run_dir", "base_model"} <= set(declared), path.name
        assigned = [line.split("=")[0].strip() for line in code[0].source.splitlines() if " = " in line.split("#")[0]]
        assert assigned == list(declared), f"{path.name}: papermill cannot parse {set(assigned) - set(declared)}"
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


def run_all(*args, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "embtune.run_all", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_run_all_trains_and_evaluates(tmp_path, tiny_models):
    """`make run-all` end to end on the tiny models: 02 mines, 03 trains on it, 04 and 05 score base against
    fine-tuned, with BM25, hybrids and the reranker; 06 fine-tunes the reranker."""
    tiny_embedding, tiny_reranker = tiny_models
    run = tmp_path / "run"
    args = ["--data", str(SAMPLES / "pydocs"), "--model", str(tiny_embedding), "--run", str(run)]
    result = run_all(*args, "--reranker", str(tiny_reranker), "--param", "rerank_top_k=20")  # 05 and 06
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "notebooks").iterdir()) == [p.name for p in NOTEBOOKS]
    # 02: one row per training pair, no labelled positive among the negatives, counts that add up
    rows = [json.loads(line) for line in (run / "hard_negatives" / "train.jsonl").read_text().splitlines()]
    stats = json.loads((run / "hard_negatives" / "stats.json").read_text())
    assert len(rows) == stats["pairs"] == 276 and stats["kept"] == sum(len(r["negative_ids"]) for r in rows)
    assert all(r["positive_id"] not in r["negative_ids"] for r in rows) and stats["kept"] > 0
    assert list((run / "cache").glob("corpus-*.npy"))
    # 03: a model this small is fully fine-tuned (LoRA is tested in test_train.py); evaluated at the last step
    log = json.loads((run / "train_log.json").read_text())
    assert "full fine-tuning" in log["backend"] and log["n_train_rows"] == 276 and log["n_dev_queries"] == 69
    assert log["eval_curve"][-1]["step"] == log["steps"] > 0  # the final step is evaluated too
    assert (run / "model" / "modules.json").exists() and (run / "train_loss.png").exists()
    # 01 is skipped (no generator: the sample has train labels)
    assert not (run / "synthetic").exists()
    # 04: quality per dimension and precision for both systems, the recommendation, the bill, the plot
    mrl = json.loads((run / "mrl.json").read_text())
    assert mrl["dims"] == [64, 32] and set(mrl["systems"]) == {"base", "finetuned"}
    assert all(set(curve) == {"64", "32"} for curve in mrl["systems"].values())
    assert set(mrl["quantized"]["finetuned"]) == {"float32", "float16", "int8", "int8+rescore", "binary",
                                                  "binary+rescore"}  # fmt: skip
    assert mrl["recommended_dim"] in (64, 32) and len(mrl["storage"]) == 3 * 2 * 4
    assert (run / "mrl.png").read_bytes()[:4] == b"\x89PNG"
    # 05: both systems, every metric, significance, ablation, report and plot
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_queries"] == 115 and metrics["n_docs"] == 639
    dense_and_more = ["base", "finetuned", "bm25", "hybrid", "hybrid_wsum", "base+rerank", "finetuned+rerank"]
    assert list(metrics["systems"]) == dense_and_more
    assert metrics["systems"]["bm25"]["ndcg@10"] > metrics["systems"]["base"]["ndcg@10"]  # random tiny embedder
    for values in metrics["systems"].values():
        assert set(values) == set(METRICS) and all(0 <= v <= 1 for v in values.values())
        assert values["recall@100"] >= values["recall@10"] >= values["recall@1"]
    assert metrics["systems"]["finetuned"] != metrics["systems"]["base"]
    assert set(metrics["significance"]["finetuned"]) == set(HEADLINE)
    # 06: the reranker trained (tiny: fully), merged into a plain CrossEncoder folder, stock against tuned
    assert (run / "reranker" / "model" / "chat_template.jinja").exists()
    reranked = json.loads((run / "reranker" / "metrics.json").read_text())
    assert list(reranked["systems"]) == ["base", "stock_rerank", "tuned_rerank"]
    ablation = metrics["instruction_ablation"]["base"]
    assert set(ablation) == {"with_instruction", "without_instruction"}
    assert ablation["with_instruction"]["ndcg@10"] == metrics["systems"]["base"]["ndcg@10"]  # Qwen's prompt
    assert sum(metrics["wins_losses"]["finetuned vs base"].values()) == 115
    report = (run / "report.md").read_text()
    assert "| finetuned |" in report and "Instruction ablation" in report and "115 queries" in report
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_notebook_05_compares_finetuned_with_base(tmp_path, tiny_embedding, minilm_path):
    """A run directory holding model/ (here the real MiniLM) is scored against the base model."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(minilm_path)
    pm.execute_notebook(
        str(ROOT / "notebooks" / "05_evaluate.ipynb"),
        str(tmp_path / "out.ipynb"),
        cwd=str(ROOT / "notebooks"),
        parameters={
            "data_dir": str(SAMPLES / "pydocs"),
            "run_dir": str(run),
            "base_model": str(tiny_embedding),
            "labelled_file": str(SAMPLES / "pydocs_labels" / "texts.jsonl"),
            "sts_file": str(SHARED / "stsbenchmark" / "sts-dev.csv"),
        },
        progress_bar=False,
        kernel_name="python3",
    )
    metrics = json.loads((run / "metrics.json").read_text())
    base, tuned = metrics["systems"]["base"], metrics["systems"]["finetuned"]
    assert tuned["ndcg@10"] > base["ndcg@10"] + 0.2
    assert metrics["significance"]["finetuned"]["ndcg@10"]["significant"]
    assert set(metrics["significance"]["finetuned"]) == set(HEADLINE)
    counts = metrics["wins_losses"]["finetuned vs base"]
    assert sum(counts.values()) == 115 and counts["wins"] > counts["losses"]
    assert metrics["tasks"]["finetuned"]["sts"]["spearman"] > metrics["tasks"]["base"]["sts"]["spearman"]
    assert set(metrics["tasks"]["base"]["classification"]) == {"accuracy", "precision", "recall", "f1"}
    assert "finetuned | " in (run / "report.md").read_text()


def test_run_all_without_labels_trains_on_synthetic_queries(tmp_path, tiny_embedding):
    """No qrels/train.tsv: notebook 01 writes queries by the inverse cloze task, and 02, 03 and 05 use them."""
    import shutil

    data = shutil.copytree(SAMPLES / "pydocs", tmp_path / "data")
    (data / "qrels" / "train.tsv").unlink()
    run = tmp_path / "run"
    args = ["--data", str(data), "--model", str(tiny_embedding), "--run", str(run)]
    refused = run_all(*args)
    assert refused.returncode == 2 and "GENERATOR=ict" in refused.stderr and not run.exists()
    # a random tiny model cannot judge relevance: the embedding filters are off here (tested with MiniLM)
    filters = ["--param", "min_cosine=None", "--param", "round_trip_k=None", "--param", "max_documents=150"]
    result = run_all(*args, "--generator", "ict", *filters)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((run / "synthetic" / "stats.json").read_text())
    assert stats["generator"] == "inverse cloze task (no LLM)" and stats["documents"] == 150 and stats["kept"] > 100
    log = json.loads((run / "train_log.json").read_text())
    assert log["n_train_rows"] == stats["kept"] and log["n_dev_queries"] == 69  # the sample's own dev split
    negatives = [json.loads(line) for line in (run / "hard_negatives" / "train.jsonl").read_text().splitlines()]
    assert len(negatives) == stats["kept"] and all(r["query_id"].startswith("synthetic:") for r in negatives)
    assert all(r["positive_id"] not in r["negative_ids"] for r in negatives)
    assert list(json.loads((run / "metrics.json").read_text())["systems"])[:2] == ["base", "finetuned"]
    typo = run_all(*args, "--generator", "ict", "--param", "min_cosin=0.5")
    assert typo.returncode == 2 and "min_cosin" in typo.stderr


def test_param_values_are_python_literals_or_strings():
    from embtune.run_all import parse_param

    assert parse_param("epochs=1") == ("epochs", 1)
    assert parse_param("min_cosine=None") == ("min_cosine", None)
    assert parse_param("matryoshka_dims=[64, 128]") == ("matryoshka_dims", [64, 128])
    assert parse_param("language=German") == ("language", "German")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_unreachable_hub_stops_in_seconds_with_one_line(tmp_path, offline):
    env = {"HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run_all(
        "--data",
        str(SAMPLES / "pydocs"),
        "--model",
        "Qwen/Qwen3-Embedding-0.6B",
        "--run",
        str(tmp_path / "run"),
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "Qwen/Qwen3-Embedding-0.6B" in line and "MODEL=" in line and "local folder" in line
    assert not (tmp_path / "run").exists()


def _defaults(cls) -> dict:
    import dataclasses

    fields = [f for f in dataclasses.fields(cls) if f.default is not f.default_factory]  # both MISSING: required
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default for f in fields}


@pytest.mark.parametrize(
    "notebook, config, minimum",
    [("03_train", "embtune.train:TrainConfig", 20), ("01_synthetic_queries", "embtune.synthetic:SynthConfig", 15)],
)
def test_notebook_defaults_are_the_library_defaults(notebook, config, minimum):
    """One source of truth: each knob of notebooks 01 and 03 starts at its config class's default (notebook 01's
    prompt knobs at PromptConfig's)."""
    import ast
    import importlib

    from embtune.generators import PromptConfig

    module, name = config.split(":")
    defaults = {**_defaults(getattr(importlib.import_module(module), name)), **_defaults(PromptConfig)}
    defaults["generator_model"] = ""  # notebook 01 is skipped unless a generator is named
    declared = pm.inspect_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"))
    shared = set(declared) & set(defaults) - {"data_dir", "run_dir", "base_model"}
    assert len(shared) > minimum
    for param in shared:
        value = ast.literal_eval(declared[param]["default"])
        assert value == defaults[param] or (param == "personas" and value is None), param
