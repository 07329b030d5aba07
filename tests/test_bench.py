"""The GPU check script's dry run: its configs build and its table is written, on a machine without a GPU."""

import subprocess

from conftest import ROOT


def test_gpu_check_dry_run_writes_its_table(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("GPU check on dry run") and text in result.stdout
    assert text.count("| dry run |") == 2 * 3 * 2  # sizes x modes x losses
    assert "0.6B (~0.60B)" in text and "4B (~4.02B)" in text  # the architectures' real sizes
