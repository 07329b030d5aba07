#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with one NVIDIA GPU and no network: run from the repository
# root with the project's .venv carried along (or `make setup` there). Prints one table last and writes it to
# docs/benchmarks/gpu_check.md. `--dry-run` needs no GPU (make test runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
exec "$PY" bench/gpu_check.py "$@"
