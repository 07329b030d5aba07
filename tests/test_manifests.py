"""embtune.rundir unit by unit: manifests and when an artifact is reused, the fingerprints (each changes with what
it names and with nothing else), the path guards and the last complete checkpoint. No model runs: milliseconds,
so that `make mutate MODULE=rundir` runs them per mutant."""

import os

import pytest

from conftest import write_beir
from embtune.rundir import (
    OverlappingPaths,
    RunDir,
    StaleArtifact,
    check_outputs,
    check_writable,
    corpus_fingerprint,
    data_fingerprint,
    differences,
    fingerprint,
    last_complete_checkpoint,
    make_manifest,
    model_fingerprint,
)

MADE = {"inputs": {"data": "d1", "base_model": "m1"}, "params": {"epochs": 2, "path": str(os.path)}}


def artifact(run: RunDir, manifest=MADE):
    """hard_negatives/ as notebook 02 leaves it, with a folder among its paths."""
    (run.root / "hard_negatives" / "parts").mkdir(parents=True, exist_ok=True)
    run.hard_negatives.write_text("rows")
    (run.root / "hard_negatives" / "parts" / "0.jsonl").write_text("{}")
    run.record("hard_negatives", manifest)
    return [run.hard_negatives, run.root / "hard_negatives" / "parts"]


def test_the_run_directory_has_the_documented_layout(tmp_path):
    """The layout README.md and the module's docstring promise, restated: notebooks and users find artifacts there."""
    run = RunDir(tmp_path)
    layout = {"synthetic": "synthetic", "hard_negatives": "hard_negatives/train.jsonl", "cache": "cache",
              "checkpoints": "checkpoints", "adapter": "adapter", "finetuned": "finetuned", "model": "model",
              "train_log": "train_log.json", "mrl": "mrl.json", "metrics": "metrics.json", "report": "report.md",
              "reranker": "reranker", "reranker_model": "reranker/model", "notebooks": "notebooks",
              "manifests": "manifests", "judged": "judged",
              "memory_plan": "memory_plan.txt"}  # fmt: skip
    assert {k: str(v.relative_to(tmp_path)) for k, v in vars(run).items() if k != "root"} == layout
    assert run.root == tmp_path and repr(run) == f"RunDir({str(tmp_path)!r})"


def test_a_manifest_holds_inputs_and_parameters_as_json():
    # parameters as JSON holds them: what is not JSON (a module, a path) by its str
    assert make_manifest({"data": "d1", "base_model": "m1"}, {"epochs": 2, "path": os.path}) == MADE
    assert differences(None, MADE) == ["no record of how it was made"]
    assert differences(MADE, MADE) == []
    other = make_manifest({"data": "d2", "base_model": "m1", "reranker": "r"}, {"epochs": 2})
    assert differences(MADE, other) == ["data", "reranker", "path"]  # inputs, then parameters; added and dropped
    assert fingerprint(MADE) == fingerprint(dict(reversed(MADE.items()))) != fingerprint(other)
    assert len(fingerprint(MADE)) == 16 and fingerprint(None) is None and fingerprint({}) is None


def test_an_artifact_is_reused_only_when_made_from_the_same_inputs(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    paths = artifact(run)
    assert not run.reusable("hard_negatives", MADE, "matching", [tmp_path / "absent"])  # nothing there to reuse
    assert run.reusable("hard_negatives", MADE, "matching", paths) and all(p.exists() for p in paths)
    changed = make_manifest({"data": "d2", "base_model": "m1"}, {**MADE["params"], "epochs": 3})
    with pytest.raises(StaleArtifact) as stale:
        run.reusable("hard_negatives", changed, "error", paths)
    assert str(stale.value) == (f"{paths[0]} was made from other inputs (changed: data, epochs); delete it, or set "
                                "reuse='matching' to rebuild it")  # fmt: skip
    assert all(p.exists() for p in paths) and run.manifest("hard_negatives") == MADE  # "error" touches nothing
    assert not run.reusable("hard_negatives", changed, "matching", paths)
    assert not any(p.exists() for p in paths) and run.manifest("hard_negatives") is None
    assert f"{paths[0]}: made from other inputs (changed: data, epochs); rebuilding" in capsys.readouterr().out
    paths = artifact(run)
    assert not run.reusable("hard_negatives", MADE, "never", paths) and not any(p.exists() for p in paths)
    assert "(changed: reuse=never); rebuilding" in capsys.readouterr().out
    paths = artifact(run)
    run.forget("hard_negatives")  # an artifact without its record is not trusted
    assert not run.reusable("hard_negatives", MADE, "matching", paths)
    with pytest.raises(ValueError, match="reuse must be one of matching, never, error, not 'sometimes'"):
        run.reusable("hard_negatives", MADE, "sometimes", paths)


def test_current_compares_only_the_inputs_asked_about(tmp_path):
    run = RunDir(tmp_path)
    assert not run.current("model", data="d1")  # no record
    run.record("model", MADE)
    assert run.current("model", data="d1") and run.current("model", data="d1", base_model="m1") and run.current("model")
    assert not run.current("model", data="d1", base_model="m2") and not run.current("model", data="d2")
    assert not run.current("model", generator="g")  # an input the record lacks does not match


def test_the_model_fingerprint_follows_the_weights_and_the_location(tmp_path):
    model = tmp_path / "model"
    (model / "1_Dense").mkdir(parents=True)
    weights = model / "model.safetensors"
    weights.write_bytes(b"12345678")
    (model / "README.md").write_text("card")
    first = model_fingerprint(model)
    assert model_fingerprint(str(model)) == first and len(first) == 16
    (model / "README.md").write_text("another card")  # not a weight
    (model / "tokenizer.json").write_text("{}")  # nor a new file beside the weights
    assert model_fingerprint(model) == first
    os.utime(weights, ns=(1, weights.stat().st_mtime_ns + 10**9))  # rewritten: same size, newer
    touched = model_fingerprint(model)
    assert touched != first
    (model / "1_Dense" / "model.safetensors").write_bytes(b"x")  # a module's weights count too
    dense = model_fingerprint(model)
    assert dense != touched
    (model / "pytorch_model.bin").write_bytes(b"y")  # and weights saved the old way
    assert model_fingerprint(model) not in (first, touched, dense)
    os.symlink(model, tmp_path / "link")
    assert model_fingerprint(tmp_path / "link") == model_fingerprint(model)  # the resolved location
    assert model_fingerprint("org/name") != model_fingerprint("org/other")  # a hub name that is not a folder


def test_the_data_fingerprint_follows_the_contents_of_the_beir_files_only(tmp_path):
    a, b = write_beir(tmp_path / "a"), write_beir(tmp_path / "b")
    assert data_fingerprint(a) == data_fingerprint(b)  # contents, not location
    assert len(data_fingerprint(a)) == 16
    (a / "README.md").write_text("notes")
    (a / "qrels" / "notes.txt").write_text("x")
    assert data_fingerprint(a) == data_fingerprint(b)
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        c = write_beir(tmp_path / name.replace("/", "_"))
        (c / name).write_text((c / name).read_text().replace("1", "7", 1))  # same size, one byte
        assert data_fingerprint(c) != data_fingerprint(b), name
    (b / "qrels" / "dev.tsv").write_text((b / "qrels" / "test.tsv").read_text())  # a new split
    assert data_fingerprint(b) != data_fingerprint(a)
    d = write_beir(tmp_path / "d")
    (d / "qrels" / "test.tsv").rename(d / "qrels" / "train.tsv")  # same bytes, another split
    e = write_beir(tmp_path / "e")
    (e / "qrels" / "test.tsv").rename(e / "qrels" / "train2.tsv")
    assert data_fingerprint(d) != data_fingerprint(e)
    (tmp_path / "gz").mkdir()
    z = write_beir(tmp_path / "gz")
    (z / "corpus.jsonl").rename(z / "corpus.jsonl.gz")
    assert data_fingerprint(z) != data_fingerprint(write_beir(tmp_path / "plain"))


def test_the_corpus_fingerprint_follows_ids_titles_and_texts_and_their_boundaries():
    corpus = {"d1": {"title": "A", "text": "bc"}, "d2": {"title": "", "text": "x"}}
    same = corpus_fingerprint(corpus)
    assert len(same) == 16
    assert corpus_fingerprint({k: dict(v) for k, v in corpus.items()}) == same
    for changed in ({"d1": {"title": "Ab", "text": "c"}},  # the same characters, another boundary
                    {"d1": {"title": "A", "text": "bd"}}, {"d3": {"title": "A", "text": "bc"}}):  # fmt: skip
        assert corpus_fingerprint({**changed, "d2": corpus["d2"]}) != same  # in the same order


def test_a_run_directory_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path):
    data, model = tmp_path / "data", tmp_path / "models" / "base"
    data.mkdir()
    model.mkdir(parents=True)
    check_outputs(tmp_path / "run", data_dir=data, base_model=model, reranker=None, missing=tmp_path / "no")
    cases = {data: "is", tmp_path / "models": "holds", data / "run": "lies inside"}
    for run, relation in cases.items():
        name, path = ("base_model", model) if relation == "holds" else ("data_dir", data)
        with pytest.raises(OverlappingPaths) as refused:
            check_outputs(run, reranker=None, data_dir=data, base_model=model)  # an absent input is passed over
        assert str(refused.value) == (f"run_dir {run.resolve()} {relation} {name} {path.resolve()}: the run would "
                                      "write into what it reads; pick a run directory outside it")  # fmt: skip
    check_outputs(tmp_path / "data2", data_dir=data)  # a sibling that shares a prefix is not inside


def test_an_unwritable_run_directory_is_named_with_the_folder_that_stops_it(read_only_folder, tmp_path):
    check_writable(tmp_path / "a" / "b")  # created later: its nearest existing parent decides
    with pytest.raises(PermissionError) as refused:
        check_writable(read_only_folder / "a" / "b")
    assert str(refused.value) == (f"run_dir {read_only_folder}/a/b: {read_only_folder} is not writable; pick a run "
                                  "directory you can write to")  # fmt: skip


def test_the_newest_complete_checkpoint_is_resumed_and_half_written_ones_are_removed(tmp_path):
    assert last_complete_checkpoint(tmp_path) is None
    for step, complete in ((9, True), (10, True), (11, False), (2, True)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    # by step number: checkpoint-10 is newer than checkpoint-9 though it sorts before it as text
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-9"]
    (tmp_path / "checkpoint-12").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert not (tmp_path / "checkpoint-12").exists()
