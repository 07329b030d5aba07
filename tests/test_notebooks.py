"""Real papermill runs of the notebooks on the tiny fixtures, asserting on what they write. One `make run-all` run
is shared by the tests that read its artifacts."""

import ast
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from conftest import ROOT, SAMPLES
from embtune.evaluate import HEADLINE, METRICS
from embtune.run_all import notebooks

ORDER = ["00_judge", "01_synthetic_queries", "02_hard_negatives", "03_train", "04_matryoshka", "05_evaluate",
         "06_reranker", "07_export"]  # fmt: skip
# Each notebook's config class; every parameter is one of its fields, except these notebook-only knobs.
CONFIGS = {
    "00_judge": "embtune.judging:JudgeConfig",
    "01_synthetic_queries": "embtune.synthetic:SynthConfig",
    "02_hard_negatives": "embtune.mine:MineConfig",
    "03_train": "embtune.train:TrainConfig",
    "04_matryoshka": "embtune.mrl:MrlConfig",
    "05_evaluate": "embtune.evaluate:EvalConfig",
    "06_reranker": "embtune.rerank_train:RerankConfig",
    "07_export": "embtune.export:ExportConfig",
}
NOTEBOOK_ONLY = {"lib_source", "example_query"}


def run_all(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "embtune.run_all", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture(scope="class")
def tiny_run(tiny_models, tmp_path_factory):
    """`make run-all` on the Chinese sample (data_samples/manpages_zh) with the tiny models and the stock reranker
    set: 01 skipped, 02-07 run."""
    tiny_embedding, tiny_reranker = tiny_models
    run = tmp_path_factory.mktemp("tiny") / "run"
    args = ["--data", str(SAMPLES / "manpages_zh"), "--model", str(tiny_embedding), "--run", str(run)]
    # the costly parts a tiny model does not need at full size: the reranked depth and the reranker's reading
    result = run_all(*args, "--reranker", str(tiny_reranker), "--param", "rerank_top_k=5",
                     "--param", "rerank_max_length=256")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def test_notebooks_are_numbered_in_pipeline_order():
    assert [p.stem for p in notebooks()] == ORDER


def images(path) -> int:
    """How many PNG images an executed notebook displays."""
    nb = nbformat.read(path, as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


class TestTinyRun:
    """`make run-all` on the Chinese sample with the tiny models, read by each test (one run for all of them;
    pytest-xdist's --dist loadscope keeps a class on one worker). Every step works in a script without spaces."""

    def test_run_all_runs_the_notebooks_in_order_and_ends_with_the_headline(self, tiny_run):
        run, result = tiny_run
        announced = [line[3:] for line in result.stdout.splitlines() if line.startswith("== ")]
        assert announced == ["00_judge.ipynb: skipped (no JUDGEMENTS file and no LLM judge: a person judges in "
                             "Jupyter)", "01_synthetic_queries.ipynb: skipped (no GENERATOR)",
                             *[f"{n}.ipynb" for n in ORDER[2:]]]  # fmt: skip
        assert all(f"   {n}.ipynb: " in result.stdout for n in ORDER[2:])  # each notebook's seconds
        assert sorted(p.name for p in (run / "notebooks").glob("*.ipynb")) == [f"{n}.ipynb" for n in ORDER[2:]]
        assert (run / "notebooks" / "kernels.log").exists() and not (run / ".previous").exists()
        assert not (run / ".lock").exists()
        tail = result.stdout.split("done: ", 1)[1]
        assert "test split, 120 queries" in tail and "system" in tail and "finetuned+tuned_rerank" in tail
        assert f"report: {run / 'report.md'}" in tail and f"executed notebooks: {run / 'notebooks'}" in tail
        assert "WARNING" not in result.stderr, result.stderr[-2000:]  # e.g. ipykernel's TCP warning per notebook

    def test_a_bad_option_value_runs_nothing_and_leaves_the_finished_run_as_it_was(self, tiny_run, tiny_models):
        run, _ = tiny_run
        finished = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
        args = ["--data", str(SAMPLES / "manpages_zh"), "--model", str(tiny_models[0]), "--run", str(run)]
        done = run_all(*args, "--param", "epochs=0")
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            "error: epochs=0 is not allowed: expected a number above 0 (a parameter of 03_train.ipynb); nothing was "
            "run"]
        assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == finished

    def test_every_promised_plot_shows_in_the_notebook(self, tiny_run):
        run, _ = tiny_run
        shown = {n: images(run / "notebooks" / f"{n}.ipynb") for n in ORDER[2:]}
        # 02: scores histogram; 03: curves, merge; 04: dimensions; 05: systems; 06 and 07 show tables only
        assert shown == {"02_hard_negatives": 1, "03_train": 2, "04_matryoshka": 1, "05_evaluate": 1,
                         "06_reranker": 0, "07_export": 0}, shown  # fmt: skip

    def test_02_mines_negatives_for_every_training_pair(self, tiny_run):
        run, _ = tiny_run
        rows = [json.loads(line) for line in (run / "hard_negatives" / "train.jsonl").read_text().splitlines()]
        stats = json.loads((run / "hard_negatives" / "stats.json").read_text())
        assert len(rows) == stats["pairs"] == 288 and stats["kept"] == sum(len(r["negative_ids"]) for r in rows) > 0
        assert all(r["positive_id"] not in r["negative_ids"] for r in rows)
        assert list((run / "cache").glob("corpus-*.npy"))
        assert not (run / "synthetic").exists()  # 01 is skipped: the sample has train labels

    def test_03_trains_evaluates_from_step_0_and_ships_what_dev_decides(self, tiny_run):
        run, _ = tiny_run
        log = json.loads((run / "train_log.json").read_text())
        assert "full fine-tuning" in log["backend"] and log["n_train_rows"] == 288 and log["n_dev_queries"] == 72
        steps = [p["step"] for p in log["eval_curve"]]
        assert steps[0] == 0 and len(steps) >= 4 and steps[-1] == log["steps"]  # the base, then along the way
        assert log["merge_with_base"] in [p["t"] for p in log["merge_curve"]]
        assert log["checkpoint_why"].startswith("checkpoint: ") and log["merge_why"].startswith("model/")
        assert (run / "model" / "modules.json").exists() and (run / "finetuned" / "modules.json").exists()

    def test_04_scores_every_dimension_and_precision(self, tiny_run):
        run, _ = tiny_run
        mrl = json.loads((run / "mrl.json").read_text())
        assert mrl["dims"] == [64, 32] and set(mrl["systems"]) == {"base", "finetuned"}
        assert all(set(curve) == {"64", "32"} for curve in mrl["systems"].values())
        assert set(mrl["quantized"]["finetuned"]) == {"float32", "float16", "int8", "int8+rescore", "binary",
                                                      "binary+rescore"}  # fmt: skip
        assert mrl["recommended_dim"] in (64, 32) and len(mrl["storage"]) == 3 * 2 * 4

    def test_05_and_06_report_every_system_the_run_trained(self, tiny_run):
        run, _ = tiny_run
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["split"] == "test" and metrics["n_queries"] == 120 and metrics["n_docs"] == 635
        assert list(metrics["systems"]) == ["base", "finetuned", "bm25", "hybrid", "hybrid_wsum", "finetuned+rerank",
                                            "finetuned+rerank fused", "finetuned+tuned_rerank",
                                            "finetuned+tuned_rerank fused"]  # fmt: skip
        # Chinese BM25 (character bigrams) finds the documents a random tiny embedder cannot
        assert metrics["systems"]["bm25"]["ndcg@10"] > 0.3 > metrics["systems"]["base"]["ndcg@10"]
        assert metrics["queries_without_results"]["bm25"] < 5
        # positives-only labels (BEIR-style): the coverage is reported, and no system is warned about
        judged = metrics["judged"]
        assert set(judged) == {"base", "finetuned", "bm25", "hybrid", "hybrid_wsum", "finetuned+rerank",
                               "finetuned+rerank fused"}  # fmt: skip
        assert all(0 < r["judged@10"] <= 1 and "warning" not in r for r in judged.values())
        assert judged["bm25"]["ndcg@10 judged only"] >= metrics["systems"]["bm25"]["ndcg@10"]
        for values in metrics["systems"].values():
            assert set(values) == set(METRICS) and all(0 <= v <= 1 for v in values.values())
            assert values["recall@100"] >= values["recall@10"] >= values["recall@1"]
        assert set(metrics["significance"]["finetuned"]) == set(HEADLINE)
        assert set(metrics["fusion"]) == {"finetuned+rerank fused", "finetuned+tuned_rerank fused"}
        assert metrics["general"]["base"] and metrics["matryoshka"]["recommended_dim"] in (64, 32)
        assert sum(metrics["wins_losses"]["finetuned vs base"].values()) == 120
        assert all({"query", "gold", "retrieved_instead"} <= set(e) for e in metrics["errors"])
        report = (run / "report.md").read_text()
        for words in ("| finetuned |", "Instruction ablation", "120 queries", "General skill kept", "Matryoshka",
                      "Judged documents",
                      "Biggest losses", "retrieved first instead", "the reranker's weight in the fused score",
                      "finetuned+tuned_rerank"):  # fmt: skip
            assert words in report, words
        assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
        card = (run / "model" / "README.md").read_text()
        assert "language: zh" in card and "NDCG@10 went from" in card and "base_model: " in card

    def test_06_trains_the_reranker_and_compares_it_with_the_stock_one(self, tiny_run):
        run, _ = tiny_run
        assert (run / "reranker" / "model" / "chat_template.jinja").exists()
        reranked = json.loads((run / "reranker" / "metrics.json").read_text())
        assert list(reranked["systems"]) == ["base", "finetuned", "finetuned+rerank", "finetuned+rerank fused",
                                             "finetuned+tuned_rerank", "finetuned+tuned_rerank fused"]  # fmt: skip

    def test_07_exports_both_models_and_proves_them_equal_to_the_trained_ones_the_way_they_are_served(self, tiny_run):
        """ONNX through the consumer client, GGUF through a real llama-server, both against plain
        sentence-transformers: every default export of both models passes."""
        run, _ = tiny_run
        parity = json.loads((run / "export" / "parity.json").read_text())
        assert set(parity) == {"embedder", "reranker"}
        for name, results in parity.items():
            checked = {r["target"]: r for r in results}
            assert set(checked) == {"onnx", "onnx-int8", "model-f16.gguf"}, name
            assert all(r["passed"] and r["error"] is None for r in checked.values()), checked
        assert parity["embedder"][-1]["long_texts"]  # what llama-server did with texts sent unclipped
        assert (run / "export" / "gguf" / "Modelfile").exists() and (run / "export" / "consumer.py").exists()
        assert (run / "export" / "onnx" / "onnx" / "model.onnx").exists()
        assert "Instruct: " in (run / "export" / "SERVING.md").read_text()  # the client adds the query prompt
        assert (run / "export" / "reranker" / "SERVING.md").exists()
        assert "## Served = trained (notebook 07)" in (run / "report.md").read_text()

    def test_the_readme_use_your_model_snippet_runs_on_the_run(self, tiny_run):
        """README's "Use your model" code, on this run's folders (push_to_hub needs the network: not run)."""
        run, _ = tiny_run
        readme = (ROOT / "README.md").read_text()
        code = readme.split("## Use your model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        code = "\n".join(line for line in code.splitlines() if "push_to_hub" not in line)
        scope = {}
        exec(code.replace("runs/mine", str(run)), scope)  # noqa: S102
        assert scope["q"].shape == scope["d"].shape and scope["q"].shape[0] == 1
        assert scope["reranker"].predict([("a query", "a document")]).shape == (1,)


@pytest.mark.parametrize("name", ORDER)
def test_notebook_is_clean_and_its_parameters_are_its_config(name):
    """One source of truth: the parameters cell declares exactly the config class's fields (plus notebook-only
    knobs), each at the class's default, and papermill can parse every assignment; no outputs are committed."""
    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs committed"
    declared = pm.inspect_notebook(str(path))
    assigned = [line.split("=")[0].strip() for line in code[0].source.splitlines() if " = " in line.split("#")[0]]
    assert assigned == list(declared), f"papermill cannot parse {set(assigned) - set(declared)}"
    module, cls = CONFIGS[name].split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    assert set(declared) - NOTEBOOK_ONLY == set(fields)
    for param, field in fields.items():
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            continue  # data_dir, run_dir, base_model: the notebook's defaults are the bundled sample's
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert ast.literal_eval(declared[param]["default"]) == default, param


def test_every_notebook_has_the_same_setup_cell_and_it_installs_from_this_repository(tmp_path):
    """One setup cell, the repository URL in one place: pyproject.toml and the notebooks change together with
    `make repository URL=...`; a notebook outside a clone installs from a clone of that URL (test_bootstrap)."""
    import re
    import tomllib

    def setup_cells(folder):
        return {c.source for p in sorted(folder.glob("*.ipynb")) for c in nbformat.read(p, as_version=4).cells
                if c.source.startswith("# Setup:")}  # fmt: skip

    [cell] = setup_cells(ROOT / "notebooks")
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert f'REPOSITORY = "{url}"' in cell and "bootstrap.py" in cell
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "notebooks", copy / "notebooks")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name)
    subprocess.run(["make", "-s", "repository", "URL=https://example.org/fork/embtune"], cwd=copy, check=True)
    [changed] = setup_cells(copy / "notebooks")
    assert re.search(r'REPOSITORY = "https://example.org/fork/embtune"', changed)
    assert 'Repository = "https://example.org/fork/embtune"' in (copy / "pyproject.toml").read_text()


def test_notebook_05_compares_finetuned_with_base(tmp_path, tiny_embedding, minilm_path):
    """A run directory holding model/ (here a copy of the real MiniLM, recorded as notebook 03 records what it
    trained) is scored against the base model; the model card goes into the run's model/, never into the installed
    MiniLM (a symlinked model/ once wrote through to it)."""
    from embtune.rundir import RunDir, data_fingerprint, make_manifest, model_fingerprint

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(minilm_path, run / "model")
    installed = {p: p.read_bytes() for p in Path(minilm_path).rglob("*") if p.is_file()}
    made_from = {"data": data_fingerprint(SAMPLES / "pydocs"), "base_model": model_fingerprint(tiny_embedding)}
    RunDir(run).record("model", make_manifest(made_from, {}))
    pm.execute_notebook(str(ROOT / "notebooks" / "05_evaluate.ipynb"), str(tmp_path / "out.ipynb"),
                        cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
                        parameters={"data_dir": str(SAMPLES / "pydocs"), "run_dir": str(run),
                                    "base_model": str(tiny_embedding),
                                    "labelled_file": str(SAMPLES / "pydocs_labels" / "texts.jsonl")})  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    base, tuned = metrics["systems"]["base"], metrics["systems"]["finetuned"]
    assert tuned["ndcg@10"] > base["ndcg@10"] + 0.2
    assert metrics["significance"]["finetuned"]["ndcg@10"]["significant"]
    counts = metrics["wins_losses"]["finetuned vs base"]
    assert sum(counts.values()) == 115 and counts["wins"] > counts["losses"]
    probe = metrics["tasks"]["finetuned"]["classification"]
    assert set(probe) == {"accuracy", "precision", "recall", "f1"}
    assert probe["accuracy"] > metrics["tasks"]["base"]["classification"]["accuracy"]
    assert "finetuned | " in (run / "report.md").read_text()
    assert (run / "model" / "README.md").read_text().startswith("---\nbase_model: ")
    assert {p: p.read_bytes() for p in Path(minilm_path).rglob("*") if p.is_file()} == installed


def test_run_all_without_labels_judges_queries_trains_on_synthetic_ones_and_proves_it_on_the_judged(
        tmp_path, tiny_embedding):  # fmt: skip
    """No labels at all, only queries: notebook 00 takes a person's grades from a file (JUDGEMENTS) into
    RUN/judged/, notebook 01 writes queries by the inverse cloze task, 02 and 03 train on them, 03 chooses what
    ships on the judged dev queries, and 05 scores on the judged test queries; the data folder is never written."""
    data = shutil.copytree(SAMPLES / "pydocs", tmp_path / "data")
    labels = {}
    for split in ("train", "dev", "test"):
        lines = (data / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        labels.update({tuple(line.split("\t")[:2]): None for line in lines if split != "train"})
        (data / "qrels" / f"{split}.tsv").unlink()
    before = {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    grades = tmp_path / "grades.tsv"  # a person's grades: the sample's own labels, as grade 3
    grades.write_text("query-id\tcorpus-id\tgrade\n" + "".join(f"{q}\t{d}\t3\n" for q, d in labels))
    run = tmp_path / "run"
    args = ["--data", str(data), "--model", str(tiny_embedding), "--run", str(run)]
    refused = run_all(*args)
    assert refused.returncode == 2 and "GENERATOR=ict" in refused.stderr and not run.exists()
    typo = run_all(*args, "--generator", "ict", "--param", "min_cosin=0.5")
    assert typo.returncode == 2 and "min_cosin" in typo.stderr
    beyond = run_all(*args, "--generator", "ict", "--until", "9")
    assert beyond.returncode == 2 and beyond.stderr.strip().splitlines() == [
        "error: --until 9: no notebook has that number (00, 01, 02, 03, 04, 05, 06, 07)"]  # fmt: skip
    missing = run_all(*args, "--generator", "ict", "--judgements", str(tmp_path / "nothing.tsv"))
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: {tmp_path / 'nothing.tsv'}: no such file")
    # a random tiny model cannot judge relevance: the embedding filters are off here (tested with MiniLM)
    filters = ["--param", "min_cosine=None", "--param", "round_trip_k=None", "--param", "max_documents=150",
               "--param", "eval_corpus_size=200", "--param", "max_queries=40"]
    result = run_all(*args, "--generator", "ict", "--judgements", str(grades), "--until", "5", *filters)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "== 00_judge.ipynb\n" in result.stdout
    assert "== 06_reranker.ipynb: skipped (after UNTIL=5)\n== 07_export.ipynb: skipped (after UNTIL=5)" in result.stdout
    assert not (run / "export").exists() and not (run / "notebooks" / "07_export.ipynb").exists()
    assert {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before  # DATA never written
    judged = json.loads((run / "judged" / "stats.json").read_text())
    queries = {q for q, _ in labels}
    assert judged["grades"] == {"person": len(labels)} and judged["dev"] + judged["test"] == len(queries)
    assert 0.35 * len(queries) < judged["dev"] < 0.65 * len(queries)
    stats = json.loads((run / "synthetic" / "stats.json").read_text())
    assert stats["generator"] == "inverse cloze task (no LLM)" and stats["documents"] == 150 and stats["kept"] > 100
    log = json.loads((run / "train_log.json").read_text())
    assert log["n_train_rows"] == stats["kept"] and log["n_dev_queries"] == judged["dev"]  # the judged dev split
    assert log["merge_curve"] and "t = 0.5" not in log["merge_why"]  # chosen on judged queries, not fixed
    negatives = [json.loads(line) for line in (run / "hard_negatives" / "train.jsonl").read_text().splitlines()]
    assert len(negatives) == stats["kept"] and all(r["query_id"].startswith("synthetic:") for r in negatives)
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["systems"])[:2] == ["base", "finetuned"]
    assert metrics["split"] == "test" and metrics["n_queries"] == judged["test"]


def test_param_values_are_python_literals_or_strings():
    from embtune.run_all import parse_param

    assert parse_param("epochs=1") == ("epochs", 1)
    assert parse_param("min_cosine=None") == ("min_cosine", None)
    assert parse_param("matryoshka_dims=[64, 128]") == ("matryoshka_dims", [64, 128])
    assert parse_param("language=German") == ("language", "German")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_unreachable_hub_stops_in_seconds_with_one_line(tmp_path, offline):
    env = {"HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = ["--data", str(SAMPLES / "pydocs"), "--model", "Qwen/Qwen3-Embedding-0.6B", "--run", str(tmp_path / "run")]
    result = run_all(*args, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "Qwen/Qwen3-Embedding-0.6B" in line and "local folder" in line
    assert "`hf download Qwen/Qwen3-Embedding-0.6B --local-dir models/Qwen3-Embedding-0.6B`" in line
    minilm = line.rsplit("`make run-all MODEL=", 1)[1].rstrip("`")  # a model this machine has, that runs now
    assert (Path(minilm) / "modules.json").exists() and "all-MiniLM-L6-v2" in line
    assert not (tmp_path / "run").exists()


def test_an_installed_wheel_finds_its_notebooks(tmp_path):
    """`embtune-run-all` from a wheel (no repository around it) runs the notebooks the wheel carries."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("embtune-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)  # fmt: skip
    script = "from embtune.run_all import notebooks; print([str(p) for p in notebooks()])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout  # fmt: skip
    found = ast.literal_eval(out)
    assert [os.path.basename(p)[:-6] for p in found] == ORDER
    assert all(p.startswith(str(tmp_path / "site")) for p in found)
