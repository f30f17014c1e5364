# ganforge: one environment (.venv), built from pyproject.toml + constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ganforge-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all bench gpu-check lint freeze clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -c constraints.txt torch torchvision
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/ganforge demo

# make test: everything but the multi-process and end-to-end tests marked `slow` (under 25 minutes
# on a 2-core machine); make test-slow: those; make test-all: both. CI (.ci/run) runs both.
test: install
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/remote.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/zero_memory.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/stacked_mnist.py
	$(BIN)/python bench/stylegan2.py

# On a GPU machine without .venv (e.g. a preinstalled torch): make gpu-check GPU_PYTHON=python3
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py

lint: install
	$(BIN)/ruff check .

freeze:
	{ echo "# Exact pins of the ganforge stack (pip install -c constraints.txt). Regenerate with: make freeze"; \
	  $(BIN)/pip freeze --exclude-editable | grep -vi -e '^ganforge' -e '^deepspeed'; echo "deepspeed==0.19.8"; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf runs .pytest_cache
