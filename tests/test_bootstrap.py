"""The setup cell's install (lib/embtune/bootstrap.py) with real pip, offline, in a fresh venv over a folder of
small wheels standing in for the registry: requirements.txt's pins hold for every package, dependencies included,
while the machine's torch and kernel stay; the cell itself refuses the placeholder repository in one line."""

import subprocess
import sys
import zipfile

import nbformat
import pytest

from conftest import ROOT
from embtune.bootstrap import canon, constraints, read_pins


def wheel(folder, name, version, requires=()):
    """A pure-Python wheel of `name` that imports, with `requires` as its dependencies."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
                 name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for archive_name, text in files.items():
            z.writestr(archive_name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A venv standing in for a Colab: torch 1.5, ipykernel 6.0 and beta 3.0 installed; the 'registry' offers
    others."""
    root = tmp_path_factory.mktemp("machine")
    index = root / "index"
    index.mkdir()
    for name, version, requires in [("torch", "1.5", ()), ("torch", "2.0", ()), ("ipykernel", "6.0", ()),
                                    ("ipykernel", "7.0", ()), ("alpha", "1.0", ()), ("alpha", "2.0", ()),
                                    ("beta", "1.0", ()), ("beta", "3.0", ()),
                                    ("xformers", "0.1", ("torch==2.0",)), ("xformers", "0.2", ("torch==1.5",)),
                                    ("xformers", "0.3", ("torch==2.0",))]:  # fmt: skip
        wheel(index, name, version, requires)
    demo = wheel(root, "demo", "1.0", ("alpha>=1.0", "torch", "ipykernel", "xformers"))
    wheel(index, "beta_user", "1.0", ("beta",))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    offline = ["--no-index", "--find-links", str(index), "--disable-pip-version-check"]
    subprocess.run([python, "-m", "pip", "install", "-q", *offline, "torch==1.5", "ipykernel==6.0", "beta==3.0"],
                   check=True)  # fmt: skip
    requirements = root / "requirements.txt"
    requirements.write_text("# pins\ntorch==2.0\nxformers==0.1\nalpha==1.0  # not the newest\nbeta==1.0\n"
                            "ipykernel==7.0\n")  # fmt: skip
    return python, offline, demo, requirements


def versions(python):
    out = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    return dict(line.split("==") for line in out.split())


def test_every_install_lands_at_the_pins_and_the_machine_keeps_its_torch_and_kernel(machine):
    python, offline, demo, requirements = machine
    result = subprocess.run([python, str(ROOT / "lib" / "embtune" / "bootstrap.py"), "--requirements",
                             str(requirements), str(demo), *offline], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    got = versions(python)
    # alpha: the pin, not the newest; torch, ipykernel: the machine's; xformers: the one built for its torch
    assert {k: got[k] for k in ("demo", "alpha", "torch", "ipykernel", "xformers")} == {
        "demo": "1.0", "alpha": "1.0", "torch": "1.5", "ipykernel": "6.0", "xformers": "0.2"}
    assert "installed at requirements.txt's versions: alpha 1.0" in result.stdout
    assert "already there: ipykernel 6.0, torch 1.5" in result.stdout
    # beta 3.0 was there and demo does not need it: left alone, and said so
    assert got["beta"] == "3.0" and f"left as they were, not needed by {demo}: beta 3.0 (pinned 1.0)" in result.stdout
    # once an install needs it (a dependency of a dependency), it moves to its pin
    later = subprocess.run([python, str(ROOT / "lib" / "embtune" / "bootstrap.py"), "--requirements",
                            str(requirements), "beta_user", *offline], capture_output=True, text=True)  # fmt: skip
    assert later.returncode == 0, later.stderr[-2000:]
    assert versions(python)["beta"] == "1.0"


def test_the_constraints_keep_the_machine_s_stack_only_where_it_has_one():
    pins = {"torch": ("torch", "2.0"), "xformers": ("xformers", "0.1"), "alpha": ("alpha", "1.0"),
            "ipykernel": ("ipykernel", "7.0")}  # fmt: skip
    # a plain machine: everything pinned
    assert constraints(pins, {}) == {"torch": "2.0", "xformers": "0.1", "alpha": "1.0", "ipykernel": "7.0"}
    # its own torch: torch kept, xformers left to the resolver; a kernel kept
    assert constraints(pins, {"torch": "1.5", "ipykernel": "6.0"}) == {"torch": "1.5", "alpha": "1.0",
                                                                        "ipykernel": "6.0"}  # fmt: skip
    # the pinned torch already there: its builds pinned as requirements.txt says
    assert constraints(pins, {"torch": "2.0"}) == {"torch": "2.0", "xformers": "0.1", "alpha": "1.0",
                                                   "ipykernel": "7.0"}  # fmt: skip


def test_requirements_pin_every_package_and_a_loose_line_is_refused_by_line(tmp_path):
    pins = read_pins(ROOT / "requirements.txt")
    for name in ("unsloth", "unsloth-zoo", "transformers", "trl", "datasets", "sentence-transformers",
                 "bitsandbytes", "peft", "cut-cross-entropy", "xformers", "triton"):  # unsloth's Colab extras too
        assert name in pins, name
    loose = tmp_path / "requirements.txt"
    loose.write_text("alpha==1.0\n\ntrl>=1.0\n")
    with pytest.raises(SystemExit, match=r"requirements.txt:3: 'trl>=1.0' is not `name==version`"):
        read_pins(loose)


def test_the_gpu_kit_carries_requirements_txt_s_versions():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_kit

    pins = read_pins(ROOT / "requirements.txt")
    kit = {canon(w.name): w.version for w in gpu_kit.WHEELS}
    assert {k: v for k, v in kit.items() if k in pins} == {k: pins[k][1] for k in kit if k in pins}
    assert kit["sentence-transformers"] == pins["sentence-transformers"][1]


def setup_cell():
    [cell] = {c.source for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
              for c in nbformat.read(p, as_version=4).cells if c.source.startswith("# Setup:")}  # fmt: skip
    return cell.replace("%matplotlib inline", "")


def test_a_notebook_outside_a_clone_refuses_the_placeholder_repository_in_one_line(tmp_path):
    (tmp_path / "notebooks").mkdir()
    # -S: without site-packages, as a Python without embtune (a Colab) sees it
    result = subprocess.run([sys.executable, "-S", "-c", "lib_source = None\n" + setup_cell()],
                            cwd=tmp_path / "notebooks", capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "REPOSITORY" in result.stderr and "make repository URL=" in result.stderr


def test_a_notebook_in_a_clone_installs_from_that_clone(tmp_path):
    """The cell hands the clone it sits in to bootstrap.py (here a copy whose bootstrap only records its call)."""
    clone = tmp_path / "clone"
    (clone / "lib" / "embtune").mkdir(parents=True)
    (clone / "notebooks").mkdir()
    (clone / "lib" / "embtune" / "bootstrap.py").write_text(
        "import sys, pathlib; pathlib.Path('called').write_text(repr(sys.argv[1:])); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-S", "-c", "lib_source = None\n" + setup_cell()],
                            cwd=clone / "notebooks", capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0  # the stand-in bootstrap fails on purpose: nothing is installed
    called = eval((clone / "notebooks" / "called").read_text())
    assert called == ["--requirements", str(clone / "requirements.txt"), f"{clone}[gpu]"]
