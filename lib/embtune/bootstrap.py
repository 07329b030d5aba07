"""Installs embtune into a Python that lacks it (Colab, a Jupyter outside this clone's .venv) at requirements.txt's
versions: every notebook's setup cell runs this file, standard library only, before embtune can be imported.

pip is given a constraints file built from requirements.txt (the one source of truth, so the Colab cell, `make
setup` and the GPU kit cannot disagree): every package it installs, asked for or pulled in as a dependency, lands
at the pinned version. unsloth's own ceilings (transformers, trl, datasets) only warn when broken; these hold. It
prints what it installed, what was already at its pin, and what it left alone at another version (not needed).
Two kinds of package stay as the machine has them instead, pinned there at their installed version: torch and what
is built against it (a Colab's CUDA torch is not to be swapped for a multi-GB download, and xformers or triton for
another torch do not load: the resolver picks the ones matching the kept torch), and the kernel running this
notebook (a new ipykernel under a live Colab kernel breaks it until a restart).

    python lib/embtune/bootstrap.py --requirements requirements.txt 'CLONE[gpu]' [pip options...]
"""

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TORCH_BUILT = {"torch", "torchvision", "torchaudio", "triton", "xformers", "torchao"}
KERNEL = {"ipykernel", "ipython", "jupyter-client", "jupyter-core", "tornado", "pyzmq", "notebook", "jupyter-server"}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name, version) of each `name==version` line; anything else is refused by line."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;,=<>!~]+)", line)
        if not match:
            raise SystemExit(f"{path}:{number}: {line!r} is not `name==version`: requirements.txt pins every "
                             "package to one version (the constraints every install uses)")  # fmt: skip
        pins[canon(match[1])] = (match[1], match[2])
    return pins


def installed_versions() -> dict[str, str]:
    return {canon(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def constraints(pins: dict[str, tuple[str, str]], installed: dict[str, str]) -> dict[str, str]:
    """name -> version pip must install. The machine's torch stack and kernel stay as installed; when its torch is
    not the pinned one, the torch-built packages it lacks are left to the resolver (matched to its torch)."""
    own_torch = "torch" in installed and installed["torch"] != pins.get("torch", (None, None))[1]
    kept = {key for key in TORCH_BUILT | KERNEL if key in installed}
    out = {pins[key][0] if key in pins else key: installed[key] for key in kept}
    for key, (name, version) in pins.items():
        if key not in kept and not (own_torch and key in TORCH_BUILT):
            out[name] = version
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, required=True, help="requirements.txt: name==version lines")
    parser.add_argument("source", help="what to install, e.g. 'path/to/clone[gpu]' or a git URL")
    args, pip_options = parser.parse_known_args(argv)
    before = installed_versions()
    wanted = constraints(read_pins(args.requirements), before)
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "constraints.txt"
        pinned.write_text("".join(f"{name}=={version}\n" for name, version in sorted(wanted.items())))
        command = [sys.executable, "-m", "pip", "install", "-q", "-c", str(pinned), *pip_options, args.source]
        print("bootstrap:", " ".join(command), flush=True)
        subprocess.check_call(command)
    after = installed_versions()
    now = {n: after[canon(n)] for n in wanted if canon(n) in after}
    new = [f"{n} {v}" for n, v in sorted(now.items()) if before.get(canon(n)) != v]
    kept = [f"{n} {v}" for n, v in sorted(now.items()) if before.get(canon(n)) == v == wanted[n]]
    # pip moves a package to its pin only when the install needs it; one that is merely present stays as it was
    other = [f"{n} {v} (pinned {wanted[n]})" for n, v in sorted(now.items()) if v != wanted[n]]
    print(f"bootstrap: installed at requirements.txt's versions: {', '.join(new) or 'nothing new'}")
    print(f"bootstrap: already there: {', '.join(kept) or 'nothing'}")
    if other:
        print(f"bootstrap: left as they were, not needed by {args.source}: {', '.join(other)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
