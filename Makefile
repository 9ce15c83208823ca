# Fresh machine: `make demo` runs the demo, `make test` runs the tests. Both create a local
# virtualenv (.venv) with torch 2.14.1 and build the C++/CUDA extension in place; the
# package is used from this checkout (PYTHONPATH), so nothing is built twice.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# One build at a time in this tree (ninja recompiles only what changed).
BUILD_LOCK := flock $(CURDIR)/.build.lock

.PHONY: demo test build bench eval info aot gpu-check clean

$(VENV)/.deps: requirements-dev.txt requirements-integrations.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt -r requirements-integrations.txt
	touch $@

build: $(VENV)/.deps
	$(BUILD_LOCK) $(PY) setup.py --quiet build_ext --inplace

test: build
	PYTHONPATH=$(CURDIR) $(PY) -m pytest -q tests

demo: build
	PYTHONPATH=$(CURDIR) $(PY) -m vft.cli demo --out demo_out

eval: build
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.eval_tokens --out results/eval_tokens

bench: build
	PYTHONPATH=$(CURDIR) $(PY) -m benchmarks.run

info: build
	PYTHONPATH=$(CURDIR) $(PY) -m vft_kernels.info

aot: build
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(PY) -m vft_kernels.triton.aot

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build vft_kernels/_C*.so .pytest_cache results demo_out
