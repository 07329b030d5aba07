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
