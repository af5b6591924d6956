# Two commands do all the set-up: `make demo` and `make test`. Both create .venv and install into it,
# idempotently: the stamp file is rebuilt only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ldm-installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install test test-fast demo fmnist bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep a torch the environment already has; otherwise the CPU build (a plain `torch` would pull CUDA).
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed: keeping it"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

fmnist:
	@if ls $(FMNIST_DIR)/train-images-idx3-ubyte.gz >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "Fashion-MNIST not found in $(FMNIST_DIR): installing Debian's dataset-fashion-mnist"; \
	    apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST not found in $(FMNIST_DIR). Install it with 'sudo apt-get install dataset-fashion-mnist'" \
	    "or put the four *-ubyte.gz IDX files there (or pass data.train.root=<dir>)."; exit 1; fi

demo: $(STAMP) fmnist
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) benchmarks/unet_speed.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ldm tests benchmarks scripts train.py sample.py eval.py

clean:
	rm -rf outputs multirun .pytest_cache
