"""The GPU check script's dry run: every row's set-up runs on the tiny fixture, on a machine without a GPU."""

import json
import os
import subprocess
import sys

import gpu_check  # bench/, which conftest puts on the path

from conftest import ROOT


def test_gpu_check_dry_run_runs_every_row(tmp_path):
    out = tmp_path / "gpu.md"
    # this test's own interpreter, whatever the clone has built: no kit, no .venv needed
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")} | {
        "GPU_CHECK_DRY_PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("GPU check on dry run") and text in result.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["row"] for r in rows] == gpu_check.ROWS
    assert all(not r["result"].startswith(("FAILED", "skipped")) for r in rows), rows
    trained = [r for r in rows if r["row"].startswith("train:")]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 and "peft" in r["backend"] for r in trained)


def test_gpu_check_parity_fails_when_the_two_backends_train_different_lora_weights(tmp_path, tiny_embedding):
    """The parity row's comparison, on two real peft steps of the tiny model: the same LoRA weights agree; with
    B drawn differently (what a backend that initialises or names its adapter otherwise would give) it fails and
    names the gradients."""
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "lora.safetensors"
    first = gpu_check.lora_step("embedder", str(tiny_embedding), "peft", str(lora))
    same = gpu_check.lora_step("embedder", str(tiny_embedding), "peft", str(lora))
    assert gpu_check.compare_steps(first, same)[0] == []
    save_file({k: (v.flip(0) if "lora_B" in k else v) for k, v in load_file(lora).items()}, lora)
    failed, _, cos = gpu_check.compare_steps(first, gpu_check.lora_step("embedder", str(tiny_embedding), "peft",
                                                                        str(lora)))  # fmt: skip
    assert cos < 0.99 and any(f.startswith("LoRA gradients at cosine") for f in failed), failed


def test_gpu_check_merged_model_check_fails_when_finetuned_is_not_the_adapter(tmp_path, tiny_embedding):
    """notebook 03's row: finetuned/ against the adapter on the base, by plain peft. A finetuned/ that is half-way
    to the base (what a merge that drops half the update would write) fails; the chosen-checkpoint check fails
    when adapter/ holds another checkpoint than the one the log names."""
    import shutil

    from embtune.merge import slerp_models
    from embtune.train import TrainConfig, train

    run = tmp_path / "run"
    log = train(TrainConfig(base_model=str(tiny_embedding), data_dir=str(ROOT / "data_samples" / "pydocs"),
                            run_dir=str(run), full_finetune=False, max_steps=6, eval_steps=3, batch_size=8,
                            max_seq_length=256, merge_with_base=1.0, merge_dtype="float32",
                            learning_rate=5e-3))  # fmt: skip
    low, _ = gpu_check.against_the_adapter(str(tiny_embedding), run / "adapter", log["finetuned_model"], True)
    assert low >= 0.999
    half = slerp_models(tiny_embedding, log["finetuned_model"], 0.5, tmp_path / "half")
    assert gpu_check.against_the_adapter(str(tiny_embedding), run / "adapter", str(half), True)[0] < 0.999
    assert gpu_check.chosen_checkpoint_matches(run, log)
    shutil.copy(run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors",
                run / "adapter" / "adapter_model.safetensors")  # fmt: skip
    assert not gpu_check.chosen_checkpoint_matches(run, {**log, "checkpoint": "end"})
