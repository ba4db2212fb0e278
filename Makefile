# Two commands: `make bench` (the benchmark table and demo) and `make test`.
# Both create .venv if needed, install torch if it is missing, and build the extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test bench build setup clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.deps

build: setup
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: build
	$(PY) -m contrastive_kernels.bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info contrastive_kernels/*.so
