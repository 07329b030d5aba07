"""The GPU kit: the wheels the lent GPU machine lacks for our training path, and a CPU replica of that machine.

The GPU machine (an H200, no network) has Python 3.12 with torch 2.11.0+cu130, transformers 5.17.0,
sentence-transformers 6.0.1, accelerate, peft and the rest of /work/.library/device/KINDS.md's list, but no
unsloth, unsloth_zoo, bitsandbytes, trl or datasets. Only the repository travels there (64 MiB in all), so
`make gpu-kit` puts those wheels, stripped of what a training import never reads, in gpu_kit/ (git-ignored;
the device tool's `carry: ["gpu_kit"]` takes it along) and bench/gpu_check.sh installs them there.

    python bench/gpu_kit.py build              # gpu_kit/: download (cached), strip, verify, print the size
    python bench/gpu_kit.py replica [--venv D] # .gpu-replica/: the machine's Python packages on this CPU
    python bench/gpu_kit.py check [--strict]   # inside gpu_check.sh's venv: versions, pip check, imports

Stdlib only: `check` runs under the machine's own Python.
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "gpu_kit"
DOWNLOADS = ROOT / "build" / "gpu-kit-downloads"  # the registry's wheels as downloaded (build/ is git-ignored)
REPLICA_REQUIREMENTS = ROOT / "bench" / "gpu_replica.txt"
MAX_KIT_MIB = 60  # the brief's cap: the working tree plus carried paths must stay under the tool's 64 MiB
TRAVEL_MIB = 64
# The machine: CPython 3.12 on x86-64 Linux. Wheels of pure Python or with these tags (the device README's) fit.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


@dataclass
class Wheel:
    name: str
    version: str
    why: str
    drop: list[str] = field(default_factory=list)  # fnmatch patterns of archive paths to leave out
    keep: list[str] = field(default_factory=list)  # exceptions to `drop`
    rewrite: dict[str, str] = field(default_factory=dict)  # archive path -> new text
    dropped_why: str = ""


def _bootstrap():
    """The setup cells' installer, loaded by path (stdlib only, no embtune __init__): its requirements.txt reader
    and package-name rule, so the kit, `make setup` and Colab cannot disagree."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "lib" / "embtune" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BOOTSTRAP = _bootstrap()
canon = BOOTSTRAP.canon
PIN = {key: version for key, (_, version) in BOOTSTRAP.read_pins(ROOT / "requirements.txt").items()}
BNB_KEEP = ["bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"]
WHEELS = [
    Wheel("unsloth", PIN["unsloth"], "the training path: FastSentenceTransformer (notebook 03), FastLanguageModel",
          drop=["studio/*", "unsloth_cli/*", "unsloth-*.dist-info/entry_points.txt"],
          rewrite={f"unsloth-{PIN['unsloth']}.dist-info/top_level.txt": "unsloth\n"},
          dropped_why="studio/ (Unsloth Studio, a web app: 77 MB of frontend and backend) and unsloth_cli/ (the "
                      "`unsloth` command, whose console script goes too): no module of unsloth/ imports either; "
                      "their own needs (tyro, typer, pydantic, structlog, json5, nest-asyncio) stay out too"),
    Wheel("unsloth_zoo", PIN["unsloth-zoo"], "unsloth's kernels and patches (imported by unsloth)"),
    Wheel("bitsandbytes", PIN["bitsandbytes"], "4-bit QLoRA",
          drop=["bitsandbytes/libbitsandbytes_*.so"], keep=BNB_KEEP,
          dropped_why="every native library but libbitsandbytes_cuda130.so and libbitsandbytes_cpu.so: "
                      "cextension.get_cuda_bnb_library_path loads the exact match of torch.version.cuda (13.0 "
                      "for torch 2.11.0+cu130) when CUDA is available, libbitsandbytes_cpu.so when it is not "
                      "(the CPU rehearsal); ROCm and XPU builds are never chosen with a CUDA torch"),
    Wheel("trl", PIN["trl"], "unsloth patches trl's trainers at import (unsloth caps it at <=1.15.0)"),
    Wheel("datasets", PIN["datasets"], "training data (embtune.train); trl and unsloth import it"),
    Wheel("dill", "0.4.1", "datasets (dill<0.4.2)"),
    Wheel("multiprocess", "0.70.19", "datasets (multiprocess<0.70.20)"),
    Wheel("fsspec", "2026.2.0", "datasets caps fsspec at <=2026.2.0; the machine's version is unknown"),
    Wheel("peft", PIN["peft"], "LoRA; the machine has some peft of unknown version, transformers 5.17 needs "
                            ">=0.19.1 and our tests run 0.21.2 (requirements.txt): carried so it is that one"),
    Wheel("sentence-transformers", PIN["sentence-transformers"], "the pinned version; the machine has 6.0.1 "
          "(pure Python, its dependencies all on the machine)"),
    Wheel("cut_cross_entropy", PIN["cut-cross-entropy"],
          "unsloth_zoo's fused cross-entropy (a dependency of a normal install)"),
]  # fmt: skip

# Requirements of the kit's wheels deliberately not carried: `check` ignores them in pip check's report.
OMITTED = {
    "xformers": "optional in unsloth (its imports are guarded; attention falls back to torch SDPA); a wheel "
                "built for torch 2.11 is over 100 MB",
    "diffusers": "unsloth's diffusion models only; never imported by the text path",
    "hf-transfer": "a fast downloader; the machine is offline (HF_HUB_OFFLINE=1)",
    "torchao": "QAT / fp8 only, every import guarded; a torchao built for another torch breaks imports",
    "tyro": "the unsloth CLI (stripped)", "typer": "the unsloth CLI (stripped)",
    "pydantic": "Unsloth Studio (stripped); unsloth_zoo's one import is guarded",
    "structlog": "Unsloth Studio (stripped)", "json5": "Unsloth Studio (stripped)",
    "nest-asyncio": "Unsloth Studio (stripped); unsloth's one import is guarded",
    "msgspec": "vLLM's LoRA requests only (unsloth_zoo.vllm_lora_request)",
    "certifi": "TLS certificates; metadata floor only, the machine is offline",
}  # fmt: skip


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def sha256_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- build


def downloaded(w: Wheel) -> Path | None:
    stem = f"{re.sub(r'[-_.]+', '_', w.name).lower()}-{w.version}-"
    found = [p for p in DOWNLOADS.glob("*.whl") if p.name.lower().startswith(stem)]
    return found[0] if len(found) == 1 else None


def download(missing: list[Wheel]) -> None:
    """One pip download for every wheel not in the cache yet: no dependencies, binaries for CPython 3.12."""
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--disable-pip-version-check", "-d", str(DOWNLOADS)]  # fmt: skip
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{w.name}=={w.version}" for w in missing]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def _removed_key(w: Wheel, path: str) -> str:
    pattern = next(p for p in w.drop if fnmatch.fnmatch(path, p))
    return pattern[:-1] if pattern.endswith("/*") else path


def dropped(w: Wheel, path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in w.drop) and not any(fnmatch.fnmatch(path, k) for k in w.keep)


def strip_wheel(w: Wheel, source: Path, target: Path) -> list[str]:
    """Rewrite `source` without the dropped paths into `target`: same name, version and tags, the other members
    byte for byte, a RECORD that lists exactly what is left (with fresh hashes), and GPU_KIT.txt saying what
    went. Deterministic, so a rebuild from the same download gives the same bytes."""
    removed, kept = [], []
    with zipfile.ZipFile(source) as zin:
        infos = zin.infolist()
        record = next(i for i in infos if i.filename.endswith(".dist-info/RECORD"))
        dist_info = record.filename.rsplit("/", 1)[0]
        for info in infos:
            if info.is_dir() or info.filename == record.filename:
                continue
            (removed if dropped(w, info.filename) else kept).append(info)
        note = (
            f"Rebuilt by bench/gpu_kit.py (`make gpu-kit`) from {source.name} (sha256 {sha256_file(source)}) for "
            f"the GPU machine.\nLeft out {len(removed)} files, {sum(i.file_size for i in removed)} bytes "
            f"uncompressed: {w.dropped_why}.\n"
            f"Patterns: drop {w.drop}, keep {w.keep}; rewritten: {sorted(w.rewrite)}.\n"
        )
        rows = []
        tmp = target.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in kept:
                data = zin.read(info)
                if info.filename in w.rewrite:
                    data = w.rewrite[info.filename].encode()
                zout.writestr(_copy_info(info), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                rows.append((info.filename, f"sha256={sha256_b64(data)}", str(len(data))))
            note_info = zipfile.ZipInfo(f"{dist_info}/GPU_KIT.txt", date_time=record.date_time)
            note_info.external_attr = 0o644 << 16
            zout.writestr(note_info, note.encode(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            rows.append((note_info.filename, f"sha256={sha256_b64(note.encode())}", str(len(note.encode()))))
            rows.append((record.filename, "", ""))
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            zout.writestr(_copy_info(record), text.getvalue().encode(), compress_type=zipfile.ZIP_DEFLATED,
                          compresslevel=9)  # fmt: skip
    tmp.replace(target)
    return [i.filename for i in removed]


def _copy_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    new.external_attr = info.external_attr
    new.create_system = info.create_system
    return new


def verify_wheel(path: Path, name: str, version: str) -> None:
    """What `pip install` relies on: a readable zip whose RECORD lists every member with its true hash and size,
    and METADATA naming this package and version."""
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad:
            raise SystemExit(f"{path.name}: corrupt member {bad}")
        names = {i.filename for i in z.infolist() if not i.is_dir()}
        record = [n for n in names if n.endswith(".dist-info/RECORD")]
        if len(record) != 1:
            raise SystemExit(f"{path.name}: {len(record)} RECORD files")
        listed = set()
        for row in csv.reader(io.StringIO(z.read(record[0]).decode())):
            if not row:
                continue
            entry, digest, size = row
            listed.add(entry)
            if entry == record[0]:
                continue
            if entry not in names:
                raise SystemExit(f"{path.name}: RECORD lists {entry}, which the wheel lacks")
            data = z.read(entry)
            if digest != f"sha256={sha256_b64(data)}" or size != str(len(data)):
                raise SystemExit(f"{path.name}: RECORD's hash or size of {entry} is wrong")
        if names - listed:
            raise SystemExit(f"{path.name}: not in RECORD: {sorted(names - listed)[:5]}")
        meta = z.read(record[0].replace("RECORD", "METADATA")).decode()
        got = tuple(re.search(rf"^{key}: (.+)$", meta, re.M).group(1).strip() for key in ("Name", "Version"))
        if (canon(got[0]), got[1]) != (canon(name), version):
            raise SystemExit(f"{path.name}: METADATA says {got}, expected {(name, version)}")


def build() -> None:
    start = time.time()
    missing = [w for w in WHEELS if downloaded(w) is None]
    if missing:
        download(missing)
    else:
        print(f"downloads: all {len(WHEELS)} wheels already in {DOWNLOADS.relative_to(ROOT)}/ (cached)")
    KIT.mkdir(exist_ok=True)
    manifest = KIT / "kit.json"
    old = {e["file"]: e for e in json.loads(manifest.read_text())["wheels"]} if manifest.exists() else {}
    entries = []
    for w in WHEELS:
        source = downloaded(w)
        if source is None:
            raise SystemExit(f"pip saved no single wheel for {w.name}=={w.version} in {DOWNLOADS}")
        target = KIT / source.name
        source_sha = sha256_file(source)
        spec = json.dumps([w.drop, w.keep, w.rewrite])
        prev = old.get(source.name)
        fresh = (prev and target.exists() and prev["source_sha256"] == source_sha and prev["spec"] == spec
                 and prev["sha256"] == sha256_file(target))  # fmt: skip
        if fresh:
            removed = prev["removed"]
        elif w.drop or w.rewrite:
            removed = strip_wheel(w, source, target)
        else:
            shutil.copyfile(source, target)
            removed = []
        verify_wheel(target, w.name, w.version)
        if isinstance(removed, list):  # what was left out: a folder pattern's files counted, other files named
            removed = dict(sorted(Counter(_removed_key(w, f) for f in removed).items()))
        entries.append({"name": w.name, "version": w.version, "file": target.name, "size": target.stat().st_size,
                        "sha256": sha256_file(target), "source_size": source.stat().st_size,
                        "source_sha256": source_sha, "spec": spec, "removed": removed, "why": w.why,
                        "stripped": w.dropped_why})  # fmt: skip
    wanted = {e["file"] for e in entries} | {"kit.json"}
    for stale in KIT.iterdir():
        if stale.name not in wanted:
            print(f"removing {stale.name} (not in the kit any more)")
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    manifest.write_text(json.dumps({"python": "3.12", "platforms": PLATFORMS, "wheels": entries}, indent=1) + "\n")
    report(entries, time.time() - start)
    verify_kit()


def verify_kit(kit: Path = KIT, wheels: list[Wheel] = WHEELS) -> None:
    """The kit on disk is what `wheels` asks for, one wheel a package, each as the manifest recorded it, under
    the size cap; else SystemExit naming what differs. Run after `build` and before `check` on the machine."""
    manifest = kit / "kit.json"
    if not manifest.exists():
        raise SystemExit(f"{kit}: no kit.json: build the kit with 'make gpu-kit'")
    entries = json.loads(manifest.read_text())["wheels"]
    on_disk = sorted(p.name for p in kit.glob("*.whl"))
    if sorted(e["file"] for e in entries) != on_disk:
        raise SystemExit(f"{kit}: the wheels on disk {on_disk} are not the manifest's: run make gpu-kit")
    asked = {(canon(x.name), x.version) for x in wheels}
    built = {(canon(e["name"]), e["version"]) for e in entries}
    if asked != built:
        raise SystemExit(f"{kit} is stale: it has {sorted(built - asked)} where the list asks for "
                         f"{sorted(asked - built)}: run make gpu-kit")  # fmt: skip
    for e in entries:
        path = kit / e["file"]
        if path.stat().st_size != e["size"] or sha256_file(path) != e["sha256"]:
            raise SystemExit(f"{path}: changed since the kit was built: run make gpu-kit")
        verify_wheel(path, e["name"], e["version"])
        if canon(e["name"]) == "bitsandbytes":
            with zipfile.ZipFile(path) as z:
                libs = sorted(n for n in z.namelist() if n.endswith(".so"))
            if libs != sorted(BNB_KEEP):
                raise SystemExit(f"{path}: native libraries {libs}, expected {sorted(BNB_KEEP)}")
    total = sum(p.stat().st_size for p in kit.iterdir() if p.is_file())
    if total > MAX_KIT_MIB * 2**20:
        raise SystemExit(f"{kit} is {mib(total)}, over {MAX_KIT_MIB} MiB")


def tree_size() -> int:
    """What the device tool sends besides carried paths: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()  # fmt: skip
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


def report(entries: list[dict], seconds: float) -> None:
    total = sum(p.stat().st_size for p in KIT.iterdir() if p.is_file())
    print(f"\ngpu_kit/ ({seconds:.1f} s):")
    print(f"  {'package':<32} {'size':>10} {'as downloaded':>14}  stripped")
    for e in entries:
        gone = ", ".join(f"{k} ({n} files)" if k.endswith("/") else k.rsplit("/", 1)[-1] for k in e["removed"]
                         for n in [e["removed"][k]]) or "-"  # fmt: skip
        print(f"  {e['name'] + '==' + e['version']:<32} {mib(e['size']):>10} {mib(e['source_size']):>14}  {gone}")
    for p in sorted(KIT.iterdir()):
        print(f"  {p.name}  {p.stat().st_size} bytes")
    tree = tree_size()
    print(f"gpu_kit/ total: {mib(total)} (limit {MAX_KIT_MIB} MiB); with the working tree ({mib(tree)}) "
          f"{mib(total + tree)} travels (limit {TRAVEL_MIB} MiB)")  # fmt: skip
    if total > MAX_KIT_MIB * 2**20:
        raise SystemExit(f"gpu_kit/ is {mib(total)}, over {MAX_KIT_MIB} MiB")
    if total + tree > TRAVEL_MIB * 2**20:
        raise SystemExit(f"gpu_kit/ plus the working tree is {mib(total + tree)}, over the tool's {TRAVEL_MIB} MiB")


# --------------------------------------------------------------------------------------------------- replica


def find_python312() -> str:
    """GPU_REPLICA_PYTHON, else pyenv's newest 3.12, else a python3.12 on PATH that runs."""
    candidates = [os.environ.get("GPU_REPLICA_PYTHON", "")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    versions = glob.glob(os.path.join(pyenv_root, "versions", "3.12.*", "bin", "python3.12"))
    candidates += sorted(versions, key=lambda p: [int(x) for x in re.findall(r"3\.12\.(\d+)", p)[:1]], reverse=True)
    candidates += [shutil.which("python3.12") or "", "/usr/bin/python3.12"]
    for c in filter(None, candidates):
        try:
            out = subprocess.run([c, "-c", "import sys, venv; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 12)":
            return c
    raise SystemExit("no Python 3.12 found (tried GPU_REPLICA_PYTHON, ~/.pyenv/versions/3.12.*, python3.12): "
                     "install one (`pyenv install 3.12`) or set GPU_REPLICA_PYTHON")  # fmt: skip


def replica(venv: Path) -> None:
    """A venv like the machine's /opt/torch/.venv: Python 3.12 and bench/gpu_replica.txt from the registry.
    Cached: a stamp holds the hash of the requirements and the Python; the same stamp skips the install."""
    start = time.time()
    python = find_python312()
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    key = hashlib.sha256(REPLICA_REQUIREMENTS.read_bytes() + f"\n{python} {version}".encode()).hexdigest()
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text().strip() == key and (venv / "bin" / "python").exists():
        print(f"replica {venv}: up to date (Python {version}, {REPLICA_REQUIREMENTS.name} unchanged): cached")
        return
    print(f"replica {venv}: building from {python} (Python {version}) and {REPLICA_REQUIREMENTS.name}", flush=True)
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "-r", str(REPLICA_REQUIREMENTS)], check=True)
    listing = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True).stdout
    (venv / "pip-freeze.txt").write_text(listing)
    stamp.write_text(key + "\n")
    print(f"replica {venv}: built in {time.time() - start:.0f} s ({len(listing.splitlines())} packages)")


# ----------------------------------------------------------------------------------------------------- check

IMPORTS = r"""
import importlib, json, sys, traceback
results = []
def attempt(label, code):
    try:
        exec(code, globals())
        results.append([label, "ok", ""])
    except BaseException as e:  # noqa: B036 - a refusal may be SystemExit too
        results.append([label, "failed", f"{type(e).__name__}: {e}"[:600]])
        traceback.print_exc()
attempt("import unsloth", "import unsloth")  # first, as unsloth asks
import torch
cuda = torch.cuda.is_available()
backend = "CPU backend" if getattr(sys.modules.get("unsloth"), "_IS_CPU_BACKEND", False) else "GPU backend"
attempt("from unsloth import FastSentenceTransformer, FastLanguageModel",
        "from unsloth import FastSentenceTransformer, FastLanguageModel")
attempt("from unsloth import FastLanguageModel", "from unsloth import FastLanguageModel")
for statement in STATEMENTS:
    attempt(statement, statement)
# The native library bitsandbytes picks for this torch's CUDA (without a GPU it loads its CPU one instead): in
# the kit, and loadable with the CUDA libraries torch brought along (loading it needs no GPU).
attempt("load bitsandbytes' library for torch's CUDA", '''
from bitsandbytes.cextension import get_cuda_bnb_library_path
from bitsandbytes.cuda_specs import CUDASpecs
import ctypes
major, minor = map(int, torch.version.cuda.split(".")[:2])
path = get_cuda_bnb_library_path(CUDASpecs((9, 0), f"{major}{minor}", (major, minor)))
assert path.exists(), f"{path.name} is not in the kit"
assert hasattr(ctypes.cdll.LoadLibrary(str(path)), "get_context"), f"{path.name} is no CUDA build"
print("bitsandbytes library:", path.name)
''')
print("IMPORTS-JSON " + json.dumps({"cuda": cuda, "torch": torch.__version__, "backend": backend,
                                     "results": results}))
"""


# Packages whose API the GPU run leans on, from the machine or the kit: their imports are checked names and all.
API_PACKAGES = {"torch", "transformers", "sentence_transformers", "peft", "datasets", "trl", "unsloth", "bitsandbytes",
                "accelerate", "huggingface_hub", "tokenizers", "safetensors", "numpy"}  # fmt: skip


def gpu_check_imports() -> list[str]:
    """Every import statement, names and all, of bench/gpu_check.py and of the embtune modules it reaches (their
    relative imports followed), that names embtune or an API package: the dry run skips the functions that
    hold most of them, so a renamed function, or an API that sentence-transformers 6.0.1 lacks, would otherwise
    fail only on the GPU."""
    statements, seen = set(), set()
    todo = [ROOT / "bench" / "gpu_check.py"]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        package = path.parent.name if path.parent.parent == ROOT / "lib" else None
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level and package:  # from .x import y inside embtune
                module = ".".join([package, *([n.module] if n.module else [])])
            elif isinstance(n, ast.ImportFrom) and n.module:
                module = n.module
            elif isinstance(n, ast.Import):
                statements.update(f"import {a.name}" for a in n.names if a.name.split(".")[0] in API_PACKAGES)
                continue
            else:
                continue
            top = module.split(".")[0]
            if top == "embtune":
                names = [a.name for a in n.names]
                todo.append(ROOT / "lib" / Path(*module.split(".")).with_suffix(".py"))
                todo += [ROOT / "lib" / Path(*module.split("."), f"{x}.py") for x in names]  # from . import x
            if top == "embtune" or top in API_PACKAGES:
                statements.add(f"from {module} import {', '.join(a.name for a in n.names)}")
    return sorted(statements, key=lambda x: (not x.startswith("import embtune"), x))


def check(strict: bool, report_path: str) -> int:
    """Run inside gpu_check.sh's venv. What the kit gave (versions, from where), pip check's complaints that
    concern the kit, then the imports of the training path, unsloth first, in a fresh interpreter."""
    from importlib import metadata

    lines, problems = [], []
    try:
        verify_kit()
    except SystemExit as e:
        problems.append(str(e))
    kit = json.loads((KIT / "kit.json").read_text())["wheels"]
    kit_names = {canon(e["name"]) for e in kit}
    lines.append(f"python {sys.version.split()[0]} at {sys.executable}")
    machine = ("torch", "transformers", "accelerate", "huggingface-hub", "numpy", "pyarrow")
    for e in kit + [{"name": n, "version": None} for n in machine]:
        try:
            dist = metadata.distribution(e["name"])
            where = str(dist.locate_file(""))
            lines.append(f"  {e['name']}=={dist.version}  ({where})")
            if e["version"] and dist.version != e["version"]:
                problems.append(f"{e['name']} is {dist.version} here, the kit has {e['version']}")
        except metadata.PackageNotFoundError:
            lines.append(f"  {e['name']}: not installed")
            problems.append(f"{e['name']} is not installed")

    out = subprocess.run([sys.executable, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True,
                         text=True)  # fmt: skip
    ignored = []
    for line in out.stdout.splitlines():
        m = re.match(r"(\S+) \S+ (?:requires|has requirement) ([A-Za-z0-9_.\-]+)", line)
        if not m:
            continue
        who, what = canon(m.group(1)), canon(m.group(2))
        if who not in kit_names and what not in kit_names:
            continue  # the machine's own affairs
        if who in kit_names and what in OMITTED and "which is not installed" in line:
            ignored.append(f"{line}  [not carried: {OMITTED[what]}]")
        else:
            problems.append(f"pip check: {line}")
    lines.append(f"pip check, restricted to the kit: {len(ignored)} requirement(s) deliberately not carried")
    lines += [f"  {x}" for x in ignored]

    # unsloth's model modules too: its CPU backend skips them at import, but they import on a CPU, so the
    # rehearsal still walks the GPU path's module graph (a missing hard dependency there fails here).
    modules = ["unsloth.models", "unsloth.models.sentence_transformer", "unsloth.models.loader", "unsloth.kernels",
               "unsloth.trainer", "unsloth_zoo", "trl", "datasets", "bitsandbytes", "peft", "cut_cross_entropy",
               "accelerate", "sentence_transformers"]  # fmt: skip
    statements = [f"import {m}" for m in modules] + ["import embtune"] + gpu_check_imports()
    code = f"STATEMENTS = {statements!r}\n" + IMPORTS
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    found = [x for x in run.stdout.splitlines() if x.startswith("IMPORTS-JSON ")]
    if run.returncode or not found:
        problems.append(f"the import check itself died (exit {run.returncode}): {run.stderr[-1500:]}")
        info = {"cuda": None, "results": []}
    else:
        info = json.loads(found[-1][len("IMPORTS-JSON ") :])
    cpu_refusal = None
    for label, status, error in info["results"]:
        lines.append(f"  {status:6} {label}" + (f": {error}" if error else ""))
        if status == "ok":
            continue
        # Without CUDA (the rehearsal), unsloth may refuse with its own message, or choose its CPU backend,
        # which has no FastSentenceTransformer: recorded, not a failure. With CUDA everything must import.
        own_refusal = "nsloth" in error and label == "import unsloth"
        cpu_backend = info.get("backend") == "CPU backend" and "FastSentenceTransformer" in label
        if not info["cuda"] and (own_refusal or cpu_backend):
            cpu_refusal = cpu_refusal or f"{label}: {error}"
        else:
            problems.append(f"{label}: {error}")
    lines.insert(1, f"torch {info.get('torch')}, CUDA available: {info['cuda']}, unsloth: {info.get('backend')}")
    said = [x.strip() for x in run.stdout.splitlines() if x.lstrip().startswith(("Unsloth", "\U0001f9a5"))]
    lines += [f"unsloth said: {x[:400]}" for x in said]
    lines += [x for x in run.stdout.splitlines() if x.startswith("bitsandbytes library:")]
    if cpu_refusal:
        lines.append(f"no GPU here, so unsloth refused as expected: {cpu_refusal}")
    if problems and run.stderr:
        lines.append("the imports' stderr (end):\n" + run.stderr[-4000:])
    lines.append(f"{len(problems)} problem(s)" + "".join(f"\n  PROBLEM: {p}" for p in problems))
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    if report_path:
        freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze",
                                 "--disable-pip-version-check"], capture_output=True, text=True).stdout  # fmt: skip
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(text + "\npip check (all):\n" + out.stdout + "\npip freeze:\n" + freeze)
        print(f"report: {report_path}")
    if problems and strict:
        print("gpu_kit check: FAILED (strict)", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build gpu_kit/ (cached downloads in build/gpu-kit-downloads/)")
    rep = sub.add_parser("replica", help="build the CPU replica of the GPU machine's Python (cached)")
    rep.add_argument("--venv", default=str(ROOT / ".gpu-replica"))
    chk = sub.add_parser("check", help="inside gpu_check.sh's venv: versions, pip check, imports")
    chk.add_argument("--strict", action="store_true", help="exit 1 on any problem (make gpu-rehearsal)")
    chk.add_argument("--report", default="", help="also write the report, pip check and pip freeze here")
    args = parser.parse_args()
    if args.command == "build":
        build()
    elif args.command == "replica":
        replica(Path(args.venv).resolve())
    else:
        return check(args.strict, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
