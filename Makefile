# Two commands: `make bench` (the tour: same loss, headline, speed, training; BENCH_ARGS=--full
# for the full sweep, --targets for the acceptance checks) and `make test`.
# Both create .venv if needed, install torch if it is missing, and build the extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test bench build setup clean

$(VENV)/.deps: requirements.txt requirements-compat.txt requirements-integrations.txt
	@echo "setting up $(VENV): $(TORCH_SPEC) (CPU), the requirements and the test-only libraries (once; about 3 minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-compat.txt
	$(PY) -m pip install -q -r requirements-integrations.txt "$(TORCH_SPEC)"
	touch $@

setup: $(VENV)/.deps

# Rebuilt only when the extension is missing or a C++/CUDA source is newer than the last build.
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
build: setup
	@if [ ! -f $(VENV)/.built ] || ! ls contrastive_kernels/_C*.so >/dev/null 2>&1 || \
	    [ -n "$$(find $(SOURCES) $(VENV)/.deps -newer $(VENV)/.built)" ]; then \
		echo "building the C++ extension (once per source change; about 1-2 minutes on 2 cores) ..."; \
		start=$$(date +%s); \
		$(PY) -m pip install -q -e . --no-build-isolation --no-deps && touch $(VENV)/.built && \
		echo "built in $$(( $$(date +%s) - start )) s"; \
	fi

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: build
	$(PY) bench/sweep.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info contrastive_kernels/*.so $(VENV)/.built
