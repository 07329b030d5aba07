#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with one NVIDIA GPU and no network, e.g. the lent H200, run
# from the repository root with gpu_kit/ carried along (`make gpu-kit`; docs/gpu_check_howto.md):
#     bash bench/gpu_check.sh --out "$OUT/gpu_check.md"        # every argument goes to bench/gpu_check.py
#
# Which Python runs gpu_check.py:
#   * `--dry-run` with GPU_CHECK_PYTHON unset (what `make test` runs): $GPU_CHECK_DRY_PYTHON (the test passes
#     its own interpreter), else the project's .venv/bin/python, directly; no kit needed.
#   * otherwise, "kit mode": the base Python is $GPU_CHECK_PYTHON, else python3 (on the GPU machine
#     /opt/torch/.venv/bin/python3: torch 2.11.0+cu130, transformers, sentence-transformers, peft...;
#     `make gpu-rehearsal` passes its CPU replica, .gpu-replica/bin/python). A fresh venv in $GPU_CHECK_VENV
#     (default ${TMPDIR:-/tmp}/embtune-gpu-check) sees the base's site-packages through a .pth file that runs
#     site.addsitedir on each of them, behind its own. Not `venv --system-site-packages`: where the base is
#     itself a venv, as there, that flag shows the packages of the interpreter under it, without torch. Then
#     `pip install --no-index --no-deps` puts gpu_kit/*.whl in the venv, over any version the base has (pip
#     leaves the base alone: it is outside the environment), and `bench/gpu_kit.py check` prints what is in
#     use, pip check's complaints about the kit and the imports of the training path (unsloth first). With
#     GPU_CHECK_STRICT=1 (make gpu-rehearsal) a problem there stops the script; without, it is printed and the
#     check goes on. That report, pip check and pip freeze land in $GPU_CHECK_REPORT, else $OUT/gpu_env.txt
#     when $OUT is set (the device tool), else nowhere. Should the base make no venv (or GPU_CHECK_NO_VENV=1),
#     the kit goes to $GPU_CHECK_VENV/site with `pip install --target`, on PYTHONPATH ahead of the base's own.
# Both modes: lib/ on PYTHONPATH (embtune, not installed), HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=false.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
dry_run=0
for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then dry_run=1; fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

dry_python=${GPU_CHECK_DRY_PYTHON:-.venv/bin/python}
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ "$dry_run" = 1 ] && [ -x "$dry_python" ]; then
    exec "$dry_python" bench/gpu_check.py "$@"
fi

if ! compgen -G "gpu_kit/*.whl" >/dev/null || [ ! -f gpu_kit/kit.json ]; then
    echo "gpu_check.sh: no gpu_kit/ here: build it with 'make gpu-kit' and carry it (device tool: carry [\"gpu_kit\"])" >&2
    exit 2
fi
base=${GPU_CHECK_PYTHON:-python3}
venv=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/embtune-gpu-check}
start=$SECONDS
pip_install=(-m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check)
if [ "${GPU_CHECK_NO_VENV:-0}" != 1 ] && "$base" -m venv --clear --without-pip "$venv"; then
    base_sites=$("$base" -c 'import os, site; print(repr([p for p in site.getsitepackages() if os.path.isdir(p)]))')
    venv_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; [site.addsitedir(p) for p in $base_sites]" >"$venv_site/_gpu_check_base_site.pth"
    # pip itself comes from the base, through the .pth; it installs into the venv, first on sys.path.
    py=$venv/bin/python
    "$py" "${pip_install[@]}" gpu_kit/*.whl
    echo "gpu_check.sh: venv $venv over $base with gpu_kit/ installed ($((SECONDS - start)) s)"
else  # no venv to be had (or GPU_CHECK_NO_VENV=1): the kit in a folder ahead of the base's site-packages
    rm -rf "$venv"
    py=$base
    "$py" "${pip_install[@]}" --target "$venv/site" gpu_kit/*.whl
    export PYTHONPATH="$venv/site:$PYTHONPATH"
    echo "gpu_check.sh: no venv; gpu_kit/ installed in $venv/site, on PYTHONPATH ahead of $base's packages ($((SECONDS - start)) s)"
fi

report=${GPU_CHECK_REPORT:-${OUT:+$OUT/gpu_env.txt}}
strict=(); if [ "${GPU_CHECK_STRICT:-0}" = 1 ]; then strict=(--strict); fi
"$py" bench/gpu_kit.py check "${strict[@]}" --report "$report"
echo "gpu_check.sh: kit checked ($((SECONDS - start)) s)"
exec "$py" bench/gpu_check.py "$@"
