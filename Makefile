# Every target bootstraps what it needs: a local virtual environment (.venv) and, for real data,
# the Debian package dataset-fashion-mnist.
VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
FMNIST    := /usr/share/datasets/fashion-mnist
SUDO      := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS      ?=
DATA_ARGS ?=

.PHONY: help venv data train test test-fast lint format bench bench-data gpu-check faults transfer notebooks clean

help:
	@echo "make train   pretrain resnet18 with MCL (3 levels) on Fashion-MNIST, CPU-sized; ARGS='key=value ...'"
	@echo "make test    run the test suite (CPU)"
	@echo "make lint    ruff check"
	@echo "make bench   FLOPs and step-time ratios of levels 1..4 -> benchmarks/results/cost.json, then make bench-data"
	@echo "make bench-data images/s of the CPU and device view pipelines and of the model step -> benchmarks/results/data.md"
	@echo "make gpu-check GPU acceptance check, every figure in one run (<= 8 min on one card) -> benchmarks/results/gpu_check.md; ARGS=--quick on the CPU"
	@echo "make faults  kill, rerun and concurrent-run cases against mcl-train -> benchmarks/results/faults.md"
	@echo "make transfer transfer benchmark: 5 rows, 3 pretraining x 2 fine-tuning seeds each, lr grid, claims table (< 2 h on 2 cores) -> benchmarks/results/{transfer,claims}.md; ARGS=--full"
	@echo "make notebooks install JupyterLab into the venv (the [notebooks] extra) and open notebooks/"
	@echo "make clean   remove the venv, outputs and caches"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip<26.2"
	$(PY) -m pip install --quiet -e ".[dev]" -c constraints.txt
	touch $(STAMP)

data: $(FMNIST)/train-images-idx3-ubyte.gz

$(FMNIST)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

train: venv data
	$(VENV)/bin/mcl-train $(ARGS)

test: venv data
	$(PY) -m pytest $(ARGS)

test-fast: venv data
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: venv
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: venv
	$(PY) -m benchmarks.cost $(ARGS)
	$(PY) -m benchmarks.data $(DATA_ARGS)

bench-data: venv
	$(PY) -m benchmarks.data $(DATA_ARGS)

gpu-check: venv
	$(PY) -m benchmarks.gpu_check $(ARGS)

faults: venv
	$(PY) -m benchmarks.faults $(ARGS)

transfer: venv data
	$(PY) -m benchmarks.transfer $(ARGS)

notebooks: venv data
	$(PY) -m pip install --quiet -e ".[dev,notebooks]" -c constraints.txt
	$(VENV)/bin/jupyter lab notebooks/ $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun lightning_logs wandb .pytest_cache .ruff_cache build src/*.egg-info benchmarks/runs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
