"""The run directory never lies: built as a hostile tester builds it, with two small data sets A and B that share
their ids, and one run directory used for both."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import SAMPLES
from embtune.data import DataError, load_beir, training_labels
from embtune.evaluate import EvalConfig, dense_systems, rerankers
from embtune.rundir import OverlappingPaths, RunDir, StaleArtifact
from embtune.train import TrainConfig, train


@pytest.fixture(scope="module")
def data_ab(tmp_path_factory):
    """A: the pydocs sample. B: the same ids, the documents' texts and the queries shuffled among them."""
    root = tmp_path_factory.mktemp("data")
    a = shutil.copytree(SAMPLES / "pydocs", root / "a")
    b = shutil.copytree(SAMPLES / "pydocs", root / "b")
    rng = random.Random(0)
    for name in ("corpus.jsonl", "queries.jsonl"):
        rows = [json.loads(line) for line in (b / name).read_text().splitlines()]
        texts = [r["text"] for r in rows]
        rng.shuffle(texts)
        (b / name).write_text("".join(json.dumps({**r, "text": t}) + "\n" for r, t in zip(rows, texts, strict=True)))
    return a, b


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small(tiny_embedding, data, run, **overrides):
    return TrainConfig(**{"base_model": str(tiny_embedding), "data_dir": str(data), "run_dir": str(run),
                          "max_steps": 4, "eval_steps": 2, "batch_size": 8, "max_seq_length": 64,
                          "eval_corpus_size": 100, "full_finetune": False, "learning_rate": 5e-3,
                          **overrides})  # fmt: skip


def test_a_checkpoint_of_other_data_is_not_resumed(tiny_embedding, data_ab, tmp_path):
    """A then B into one run directory ships the model a fresh B run ships (A's finished checkpoint is not
    resumed at learning rate 0); with reuse="error" the second run stops with one line naming what changed."""
    a, b = data_ab
    train(small(tiny_embedding, a, tmp_path / "run"))
    log = train(small(tiny_embedding, b, tmp_path / "run"))
    fresh = train(small(tiny_embedding, b, tmp_path / "fresh"))
    weights = "model/model.safetensors"
    assert sha(tmp_path / "run" / weights) == sha(tmp_path / "fresh" / weights)
    assert log["eval_curve"] == fresh["eval_curve"] and log["config"]["data_dir"] == str(b)
    with pytest.raises(StaleArtifact, match=r"checkpoints was made from other inputs \(changed: data\)"):
        train(small(tiny_embedding, a, tmp_path / "run", reuse="error"))
    changed = small(tiny_embedding, b, tmp_path / "run", learning_rate=1e-3, reuse="error")  # a parameter
    with pytest.raises(StaleArtifact, match="changed: learning_rate"):
        train(changed)


def test_a_model_of_other_data_is_not_scored(tiny_embedding, tiny_models, data_ab, tmp_path, capsys):
    """Notebooks 04-06 score run_dir/model and run_dir/reranker/model only when they were made from this data
    (and base models): the fine-tuned and tuned-rerank systems of data A are not reported for data B."""
    a, b = data_ab
    run = tmp_path / "run"
    train(small(tiny_embedding, a, run))
    reranker = str(tiny_models[1])
    shutil.copytree(tiny_models[1], run / "reranker" / "model")  # as notebook 06 would leave it, trained on A
    from embtune.rundir import data_fingerprint, make_manifest, model_fingerprint

    RunDir(run).record("reranker", make_manifest({"data": data_fingerprint(a), "reranker_model":
                                                  model_fingerprint(reranker)}, {}))  # fmt: skip
    on_a = EvalConfig(data_dir=str(a), run_dir=str(run), base_model=str(tiny_embedding), reranker_model=reranker)
    on_b = EvalConfig(data_dir=str(b), run_dir=str(run), base_model=str(tiny_embedding), reranker_model=reranker)
    assert set(dense_systems(on_a)) == {"base", "finetuned"} and set(rerankers(on_a)) == {"rerank", "tuned_rerank"}
    assert set(dense_systems(on_b)) == {"base"} and set(rerankers(on_b)) == {"rerank"}
    assert "not scored" in capsys.readouterr().out
    other_base = EvalConfig(data_dir=str(a), run_dir=str(run), base_model=str(tiny_models[1]))
    assert set(dense_systems(other_base)) == {"base"}  # trained from another base model


def test_synthetic_queries_of_other_data_or_another_generator_are_not_used(tiny_embedding, data_ab, tmp_path):
    from embtune.models import load_embedder
    from embtune.synthetic import SynthConfig, generate

    a, b = data_ab
    run = tmp_path / "run"
    model = load_embedder(str(tiny_embedding))

    def make(data, generator):
        config = SynthConfig(data_dir=str(data), run_dir=str(run), base_model=str(tiny_embedding), max_documents=40,
                             generator_model=generator, min_cosine=None, round_trip_k=None)  # fmt: skip
        return generate(model, str(tiny_embedding), load_beir(data), config)

    make(a, "ict")
    assert training_labels(load_beir(b), run).qrels.keys() == load_beir(b).relevant("train").keys()  # A's not used
    stats = make(b, "ict")
    queries = [json.loads(x) for x in (run / "synthetic" / "queries.jsonl").read_text().splitlines()]
    corpus_b = {d: doc["text"] for d, doc in load_beir(b).corpus.items()}
    assert all(q["text"] in corpus_b[q["_id"].split("#")[0]] for q in queries)  # spans of B's documents
    stats = make(b, "crop")
    assert stats["generator"].startswith("independent cropping") and stats["documents"] == 40
    journal = [json.loads(x) for x in (run / "synthetic" / "generations.jsonl").read_text().splitlines()]
    assert {row["generator"] for row in journal} == {stats["generator"]}  # the ICT rows went with their record


def test_a_run_never_writes_into_its_inputs(tiny_embedding, tmp_path):
    """`--model RUN/model --run RUN` used to overwrite the base model it read: refused in one line, before any
    work, by make run-all and by the library."""
    run = tmp_path / "run"
    shutil.copytree(tiny_embedding, run / "model")
    before = sha(run / "model" / "model.safetensors")
    args = ["--data", str(SAMPLES / "pydocs"), "--model", str(run / "model"), "--run", str(run)]
    done = subprocess.run([sys.executable, "-m", "embtune.run_all", *args], capture_output=True, text=True)
    [line] = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith("error: run_dir") and "holds base_model" in line
    with pytest.raises(OverlappingPaths, match="holds base_model"):
        train(small(run / "model", SAMPLES / "pydocs", run))
    assert sha(run / "model" / "model.safetensors") == before and not (run / "checkpoints").exists()


def test_what_is_known_before_training_is_checked_before_training(tmp_path, tiny_embedding, monkeypatch):
    """Relative model paths become absolute (the notebooks run in their own folder), and a corpus with no test or
    dev labels skips the evaluation notebooks with the reason."""
    import argparse

    from embtune.run_all import notebooks, preflight, skip_reason

    data = shutil.copytree(SAMPLES / "pydocs", tmp_path / "data")
    for split in ("train", "dev", "test"):
        (data / "qrels" / f"{split}.tsv").unlink()
    monkeypatch.chdir(tiny_embedding.parent)
    args = argparse.Namespace(data=str(data), model=tiny_embedding.name, run=str(tmp_path / "run"), generator="ict",
                              reranker="", judgements="", limits="off", param=[])  # fmt: skip
    params, conditions = preflight(args)
    assert params["base_model"] == str(tiny_embedding.resolve())
    reasons = {p.stem: skip_reason(p, conditions) for p in notebooks()}
    assert reasons["04_matryoshka"] == reasons["05_evaluate"] == \
        "no test or dev labels in DATA or judged in notebook 00 to evaluate on"
    assert reasons["03_train"] is None and reasons["06_reranker"] == "no RERANKER"
    assert reasons["00_judge"] == "no JUDGEMENTS file and no LLM judge: a person judges in Jupyter"
    # judgements coming (a file, an LLM judge) or already judged in RUN/judged/: 04 and 05 run
    for change in ({"judgements": __file__}, {"param": [("judge", "llm")]}):
        _, conditions = preflight(argparse.Namespace(**{**vars(args), **change}))
        assert skip_reason(notebooks()[5], conditions) is None
    (tmp_path / "run" / "judged" / "qrels").mkdir(parents=True)
    (tmp_path / "run" / "judged" / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n")
    _, conditions = preflight(args)
    assert skip_reason(notebooks()[5], conditions) is None and skip_reason(notebooks()[0], conditions)


def test_a_read_only_run_directory_is_one_line(read_only_folder, minilm_path):
    args = ["--data", str(SAMPLES / "pydocs"), "--model", minilm_path, "--run", str(read_only_folder / "run")]
    done = subprocess.run([sys.executable, "-m", "embtune.run_all", *args], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith(f"error: run_dir {read_only_folder}/run: {read_only_folder} is not writable")


@pytest.mark.parametrize("split", ["test", "dev"])  # dev too: the checkpoint and the slerp t are chosen on it
def test_a_query_in_train_and_a_held_out_split_is_refused_or_dropped(tmp_path, split):
    data = shutil.copytree(SAMPLES / "pydocs", tmp_path / "data")
    test_line = (data / "qrels" / f"{split}.tsv").read_text().splitlines()[1]
    with open(data / "qrels" / "train.tsv", "a") as f:
        f.write(test_line + "\n")  # a held-out query's label copied into train
    loaded = load_beir(data)
    with pytest.raises(DataError, match=r"train.tsv: query ids labelled in train and in dev/test: .* \(1 in all\)"):
        training_labels(loaded, tmp_path / "run")
    with pytest.warns(UserWarning, match="left out of training"):
        labels = training_labels(loaded, tmp_path / "run", split_overlap="drop")
    assert test_line.split("\t")[0] not in labels.qrels


KILLED_WHILE_REPLACING = """
import sys
from pathlib import Path
from embtune.files import replace_dir

target, n = Path(sys.argv[1]), 0
while True:
    n += 1
    with replace_dir(target) as tmp:
        for i in range(200):
            (tmp / f"part{i}").write_text(str(n) * 500)
        (tmp / "complete").write_text(str(n))
"""


def test_replace_dir_leaves_a_complete_folder_whenever_it_is_killed(tmp_path):
    target = tmp_path / "model"
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_REPLACING, str(target)])
        while not (target / "complete").exists():
            time.sleep(0.05)
        time.sleep(0.1 + 0.13 * attempt)  # a different moment of the replacing loop each time
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n = (target / "complete").read_text()
        assert len(list(target.glob("part*"))) == 200 and all(p.read_text() == n * 500 for p in target.glob("part*"))
