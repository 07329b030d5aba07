"""What a hostile or unlucky user does to `make run-all`, on notebooks of a few cells (the series' own notebooks
are run by test_notebooks.py): a notebook that raises, a kernel killed from outside (the out-of-memory killer's
way), Ctrl-C, a write error, `make run-all` itself killed, two runs into one folder. Each ends in one line and an
exit status, and leaves the last finished run's outputs byte for byte as they were."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from conftest import SAMPLES

WRITE = """
from pathlib import Path
(Path(run_dir) / "model").mkdir(exist_ok=True)
(Path(run_dir) / "model" / "weights.bin").write_text(value)
(Path(run_dir) / "result.txt").write_text(value)
"""
THEN = """
import os, signal, time
from pathlib import Path
if fail == "error":
    raise ValueError("boom")
if fail == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if fail == "interrupt":
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(30)
if fail == "hang":
    time.sleep(120)
(Path(run_dir) / "report.md").write_text(f"report of {value}")
"""


def notebook(path, parameters: str, code: str, outputs: list[str]):
    cells = [new_code_cell(parameters, metadata={"tags": ["parameters"]}), new_code_cell(code)]
    nbformat.write(new_notebook(cells=cells, metadata={"embtune": {"outputs": outputs},
                                                       "kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}}), path)  # fmt: skip


@pytest.fixture
def series(tmp_path, tiny_embedding):
    """Two notebooks (01 writes model/ and result.txt, 02 writes report.md or fails as asked) and the arguments of
    a run of them."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook(folder / "01_write.ipynb", 'run_dir = ""\nvalue = "a"', WRITE, ["model", "result.txt"])
    notebook(folder / "02_then.ipynb", 'run_dir = ""\nvalue = "a"\nfail = ""', THEN, ["report.md"])
    run = tmp_path / "run"
    args = ["--data", str(SAMPLES / "pydocs"), "--model", str(tiny_embedding), "--run", str(run),
            "--notebooks", str(folder)]  # fmt: skip
    return run, args


def start(args, *extra):
    return subprocess.Popen([sys.executable, "-m", "embtune.run_all", *args, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def run_all(args, *extra):
    process = start(args, *extra)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def state(run) -> dict[str, str]:
    """Every file of the run directory by its hash, but for the kernels' log and a failed notebook's traceback."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "kernels.log" and not p.name.endswith(".failed.ipynb")}  # fmt: skip


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_failure_of_any_kind_is_one_line_and_leaves_the_finished_run_as_it_was(series):
    run, args = series
    assert run_all(args)[0] == 0
    finished = state(run)
    assert finished["result.txt"] and finished["report.md"] and "notebooks/02_then.ipynb" in finished
    failed = run / "notebooks" / "02_then.failed.ipynb"

    code, _, err = run_all(args, "--param", "value=b", "--param", "fail=error")
    assert code == 2 and one_line(err) == (f"error: 02_then.ipynb failed: ValueError: boom (the notebook with its "
                                           f"traceback: {failed}); the last finished run's outputs are back in place")
    assert state(run) == finished
    assert failed.exists()

    code, _, err = run_all(args, "--param", "value=b", "--param", "fail=kill")
    assert code == 2 and one_line(err).startswith("error: 02_then.ipynb: its kernel died (killed from outside; most "
                                                  "often the out-of-memory killer")  # fmt: skip
    assert err.strip().endswith("the last finished run's outputs are back in place")
    assert state(run) == finished

    code, _, err = run_all(args, "--param", "value=b", "--param", "fail=interrupt")
    assert code == 130 and one_line(err) == ("interrupted in 02_then.ipynb: rerun the same command to resume; the "
                                             "last finished run's outputs are back in place")
    assert state(run) == finished

    code, out, err = run_all(args, "--param", "value=b")  # a finished run replaces the finished run
    assert code == 0, err
    assert (run / "result.txt").read_text() == "b" and (run / "report.md").read_text() == "report of b"
    assert not failed.exists() and not (run / ".previous").exists() and not (run / ".lock").exists()


def test_make_run_all_killed_outright_is_put_back_by_the_next_run(series):
    run, args = series
    assert run_all(args)[0] == 0
    finished = state(run)
    process = start(args, "--param", "value=b", "--param", "fail=hang")
    for line in process.stdout:
        if line.startswith("== 02_then.ipynb"):
            break
    time.sleep(2)
    os.killpg(process.pid, signal.SIGKILL)  # run-all and its kernel, with no chance to clean up
    process.wait()
    assert (run / ".lock").exists() and (run / "result.txt").read_text() == "b"  # half-way: 01 redone, 02 not
    code, out, err = run_all(args, "--param", "fail=error")
    assert "taking over the lock of a run that is gone" in out
    assert "the last run was killed before it finished; its predecessor's outputs are back in place" in out
    assert code == 2 and state(run) == finished


def test_two_runs_never_share_a_folder(series):
    run, args = series
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "started": "2026-12-06 10:00:00"}))
        code, out, err = run_all(args)
        assert code == 2 and one_line(err) == (f"error: {run} is in use by another run (pid {holder.pid}, started "
                                               "2026-12-06 10:00:00); wait for it to end, or pass another RUN")
        assert not (run / "result.txt").exists()
    finally:
        holder.kill()
        holder.wait()
    code, out, err = run_all(args)  # its holder is gone: taken over, with a line
    assert code == 0 and f"{run / '.lock'}: taking over the lock of a run that is gone (pid {holder.pid}" in out


def test_a_write_error_is_one_line(series, read_only_folder):
    run, args = series
    run.mkdir()
    (run / "notebooks").symlink_to(read_only_folder)
    code, _, err = run_all(args)
    assert code == 2 and one_line(err).startswith("error: 01_write.ipynb: Read-only file system: ")


BASE = {"data_dir": "data", "run_dir": "run", "base_model": "model"}


@pytest.mark.parametrize("config, value, allowed", [
    ("embtune.train:TrainConfig", {"loss": "qwen4"}, "one of 'auto', 'qwen3', 'cached_qwen3', 'mnrl', 'cached_mnrl', "
                                                      "'triplet'"),
    ("embtune.train:TrainConfig", {"epochs": 0}, "a number above 0"),
    ("embtune.train:TrainConfig", {"learning_rate": -1e-4}, "a number above 0"),
    ("embtune.train:TrainConfig", {"backend": "vllm"}, "one of 'auto', 'unsloth', 'peft'"),
    ("embtune.train:TrainConfig", {"quant": "3bit"}, "one of 'auto', '4bit', '8bit', 'none'"),
    ("embtune.train:TrainConfig", {"matryoshka_dims": [256, 0]}, "a list of which each item is a number of at least 1"),
    ("embtune.train:TrainConfig", {"batch_size": "32"}, "an integer"),
    ("embtune.train:TrainConfig", {"max_steps": 0}, "-1 (the epochs decide) or a number of steps above 0"),
    ("embtune.train:TrainConfig", {"merge_with_base": 1.5}, '"auto" or a number from 0 (the base) to 1 (as trained)'),
    ("embtune.train:TrainConfig", {"dev_fraction": 1.0}, "a number in (0, 1)"),
    ("embtune.mine:MineConfig", {"candidates": "sparse"}, "one of 'dense', 'bm25', 'both'"),
    ("embtune.synthetic:SynthConfig", {"min_cosine": 2}, '"auto", None (off) or a cosine from -1 to 1'),
    ("embtune.synthetic:SynthConfig", {"query_types": ["keyword", "essay"]},
     "a list of which each item is one of 'keyword', 'question', 'long'"),
    ("embtune.evaluate:EvalConfig", {"split": "train"}, "one of 'test', 'dev'"),
    ("embtune.evaluate:EvalConfig", {"hybrid_weights": [1.0]}, "two weights (dense, BM25), not negative, not both 0"),
    ("embtune.mrl:MrlConfig", {"dims": [512, -1]}, "a list of which each item is a number of at least 1"),
    ("embtune.rerank_train:RerankConfig", {"epochs": -1.0}, "a number above 0"),
    ("embtune.export:ExportConfig", {"formats": ["onnx", "tflite"]},
     "a list of which each item is one of 'onnx', 'onnx-int8', 'onnx-int8-dynamic', 'gguf'"),
    ("embtune.judging:JudgeConfig", {"judge": "crowd"}, "one of 'person', 'llm'"),
    ("embtune.config:StepConfig", {"doc_template": "{title}"},
     'a template holding "{text}" (and "{title}" if you like)'),
    ("embtune.config:StepConfig", {"seed": 4.2}, "an integer"),
])  # fmt: skip
def test_every_option_value_is_checked_when_its_step_is_configured(config, value, allowed):
    """One line naming the parameter, the value and what is allowed; the same check for the notebooks (from_params),
    `make run-all` (before any notebook starts) and `python -m embtune.train`."""
    import importlib

    from embtune.config import OptionError

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    [(key, bad)] = value.items()
    with pytest.raises(OptionError) as raised:
        cls.from_params({**BASE, **value})
    assert str(raised.value) == f"{key}={bad!r} is not allowed: expected {allowed}"
    cls.from_params(BASE)  # the defaults pass


def test_the_training_command_line_says_a_bad_value_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "embtune.train", "--data_dir", "d", "--run_dir", str(tmp_path),
                           "--base_model", "m", "--loss", "qwen4"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: loss='qwen4' is not allowed: expected one of 'auto', 'qwen3', 'cached_qwen3', 'mnrl', 'cached_mnrl', "
        "'triplet'"]  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_windows_line_ends_and_a_path_with_spaces_and_cjk_load_and_utf16_is_one_line(tmp_path):
    """Cases that worked when the hostile review tried them, kept working: CRLF files in a folder named with
    spaces and Chinese load as their LF twins; a UTF-16 file (Windows Notepad's "Unicode") is refused in one line
    naming the file, the line and the fix."""
    from conftest import write_beir
    from embtune.data import DataError, load_beir

    plain = load_beir(write_beir(tmp_path / "plain"), limits="off")
    folder = write_beir(tmp_path / "我的 数据 (v2)")
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / "test.tsv"):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    crlf = load_beir(folder, limits="off")
    assert (crlf.corpus, crlf.queries, crlf.qrels) == (plain.corpus, plain.queries, plain.qrels)
    queries = folder / "queries.jsonl"
    queries.write_bytes(queries.read_text(encoding="utf-8").encode("utf-16"))
    with pytest.raises(DataError) as raised:
        load_beir(folder, limits="off")
    assert str(raised.value) == (f"{queries}:1: bytes that are not UTF-8 (invalid start byte at byte 0). Fix: "
                                 "re-encode the file as UTF-8 (e.g. `iconv -f <encoding> -t utf-8`)")  # fmt: skip


def test_the_option_mixins_check_themselves_when_used_alone():
    """LoraOptions and PromptConfig are also built alone (the benchmarks, `lora.plan`): the same check, one line."""
    from embtune.config import OptionError
    from embtune.generators import PromptConfig
    from embtune.lora import LoraOptions

    with pytest.raises(OptionError, match=r"^quant='3bit' is not allowed: expected one of 'auto', '4bit', '8bit', "):
        LoraOptions(quant="3bit")
    with pytest.raises(OptionError, match=r"^query_types=\['essay'\] is not allowed: expected a list of which each "):
        PromptConfig(query_types=["essay"])
