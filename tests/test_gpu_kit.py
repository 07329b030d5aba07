"""The GPU kit (bench/gpu_kit.py, `make gpu-kit`) and bench/gpu_check.sh's kit mode, checked cheaply: no network,
no download, no replica. The kit's own checks on a replica of the GPU machine are `make gpu-rehearsal`'s."""

import importlib.util
import json
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "bench" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(spec)
sys.modules["gpu_kit"] = gpu_kit  # its dataclasses look their module up
spec.loader.exec_module(gpu_kit)


def fake_wheel(path, files):
    """A wheel of package `demo` 1.0 holding `files` (archive path -> text), with a true RECORD."""
    files = {**files, "demo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n"}  # fmt: skip
    record = "".join(f"{n},sha256={gpu_kit.sha256_b64(t.encode())},{len(t.encode())}\n" for n, t in files.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), text)
        z.writestr(zipfile.ZipInfo("demo-1.0.dist-info/RECORD", date_time=(2026, 1, 1, 0, 0, 0)),
                   record + "demo-1.0.dist-info/RECORD,,\n")  # fmt: skip
    return path


def test_stripped_wheel_keeps_a_true_record_and_pip_installs_it(tmp_path):
    (tmp_path / "src").mkdir()
    source = fake_wheel(tmp_path / "src" / "demo-1.0-py3-none-any.whl",
                        {"demo/__init__.py": "X = 1\n", "demo/lib_cuda118.so": "old", "demo/lib_cuda130.so": "new",
                         "studio/app.js": "big", "demo-1.0.dist-info/top_level.txt": "demo\nstudio\n"})  # fmt: skip
    wheel = gpu_kit.Wheel("demo", "1.0", "test", drop=["studio/*", "demo/lib_*.so"], keep=["demo/lib_cuda130.so"],
                          rewrite={"demo-1.0.dist-info/top_level.txt": "demo\n"}, dropped_why="test")  # fmt: skip
    targets = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        targets.append(tmp_path / run / source.name)
        removed = gpu_kit.strip_wheel(wheel, source, targets[-1])
        assert sorted(removed) == ["demo/lib_cuda118.so", "studio/app.js"]
        gpu_kit.verify_wheel(targets[-1], "demo", "1.0")
    assert targets[0].read_bytes() == targets[1].read_bytes()  # deterministic: a rebuild changes nothing
    with zipfile.ZipFile(targets[0]) as z:
        names = set(z.namelist())
        assert "demo/lib_cuda130.so" in names and not {"demo/lib_cuda118.so", "studio/app.js"} & names
        assert z.read("demo-1.0.dist-info/top_level.txt") == b"demo\n"
        assert "demo-1.0.dist-info/GPU_KIT.txt" in names
    # pip, offline and without dependencies, as gpu_check.sh runs it
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--target", str(site), str(targets[0])],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (site / "demo" / "lib_cuda130.so").exists() and not (site / "studio").exists()
    assert not (site / "demo" / "lib_cuda118.so").exists()


def test_verify_wheel_catches_a_record_that_lies(tmp_path):
    path = fake_wheel(tmp_path / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": "X = 1\n"})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("demo/extra.py", "not in RECORD")
    with pytest.raises(SystemExit, match="not in RECORD"):
        gpu_kit.verify_wheel(path, "demo", "1.0")


def test_the_kit_list_is_consistent():
    names = [gpu_kit.canon(w.name) for w in gpu_kit.WHEELS]
    assert len(names) == len(set(names))  # one version of each: two stop the whole install
    assert not set(names) & set(gpu_kit.OMITTED)
    assert {"unsloth", "unsloth-zoo", "bitsandbytes", "trl", "datasets"} <= set(names)
    assert "bitsandbytes/libbitsandbytes_cuda130.so" in gpu_kit.BNB_KEEP  # torch 2.11.0+cu130 loads this one


def test_a_kit_is_verified_against_its_list_and_a_stale_or_changed_one_is_named(tmp_path):
    kit = tmp_path / "gpu_kit"
    kit.mkdir()
    path = fake_wheel(kit / "demo-1.0-py3-none-any.whl", {"demo/__init__.py": "X = 1\n"})
    entry = {"name": "demo", "version": "1.0", "file": path.name, "size": path.stat().st_size,
             "sha256": gpu_kit.sha256_file(path)}  # fmt: skip
    (kit / "kit.json").write_text(json.dumps({"wheels": [entry]}))
    gpu_kit.verify_kit(kit, [gpu_kit.Wheel("demo", "1.0", "test")])
    with pytest.raises(SystemExit, match=r"is stale: it has \[\('demo', '1.0'\)\] where the list asks for "
                                         r"\[\('demo', '1.1'\)\]: run make gpu-kit"):  # fmt: skip
        gpu_kit.verify_kit(kit, [gpu_kit.Wheel("demo", "1.1", "test")])
    fake_wheel(kit / "other-1.0-py3-none-any.whl", {"other/__init__.py": ""})
    with pytest.raises(SystemExit, match="are not the manifest's"):
        gpu_kit.verify_kit(kit, [gpu_kit.Wheel("demo", "1.0", "test")])
    (kit / "other-1.0-py3-none-any.whl").unlink()
    fake_wheel(path, {"demo/__init__.py": "X = 2\n"})
    with pytest.raises(SystemExit, match="changed since the kit was built"):
        gpu_kit.verify_kit(kit, [gpu_kit.Wheel("demo", "1.0", "test")])


def test_gpu_check_without_a_kit_fails_with_one_clear_line(tmp_path):
    (tmp_path / "bench").mkdir()
    script = tmp_path / "bench" / "gpu_check.sh"
    script.write_bytes((ROOT / "bench" / "gpu_check.sh").read_bytes())
    for args in (["--out", "x.md"], ["--dry-run"]):  # no .venv here: a dry run takes the kit path too
        result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                                env={"PATH": "/usr/bin:/bin"})  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0 and "make gpu-kit" in result.stderr


def test_kit_paths_are_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "gpu_kit/x.whl", ".gpu-replica/bin/python",
                              "build/gpu-kit-downloads/x.whl"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert ignored.stdout.split() == ["gpu_kit/x.whl", ".gpu-replica/bin/python", "build/gpu-kit-downloads/x.whl"]


def test_the_import_check_reads_what_gpu_check_imports():
    statements = gpu_kit.gpu_check_imports()
    assert any(s.startswith("from embtune.") for s in statements) and any("torch" in s for s in statements)
    for statement in statements:
        compile(statement, "<check>", "exec")
        module = statement.split()[1]
        if module.startswith("embtune."):
            assert (ROOT / "lib" / module.replace(".", "/")).with_suffix(".py").exists() or (
                ROOT / "lib" / module.replace(".", "/") / "__init__.py"
            ).exists(), statement
