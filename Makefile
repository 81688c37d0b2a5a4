# attamba — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-gpu demo sweep figures ui slurm-up slurm-down gpu-wheel clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	# mistral-common only ships the SentencePiece model we test with; its deps are not needed
	$(PIP) install --quiet --no-deps mistral-common==1.13.1
	$(PY) -m attamba.data.prepare --root runs/data
	touch $(STAMP)

install: $(STAMP) ## create .venv, install attamba (CPU torch) and prepare the embedded corpus

test: install ## run the test suite (fast tests; slow/gpu/slurm are opt-in markers)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: install ## run every CPU test, slow ones included
	$(VENV)/bin/pytest -m 'not gpu and not slurm' $(PYTEST_ARGS)

demo: install ## train a small real sweep on the embedded corpus, log to MLflow in runs/, draw figures
	$(VENV)/bin/attamba-train -m experiment=demo

clean: ## remove the virtual environment and everything under runs/
	rm -rf $(VENV) runs/*

gpu-wheel: install ## build mamba-ssm's pure-Python wheel (Triton kernels, no CUDA build) into wheels/
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
	CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(PIP) wheel --no-deps --no-build-isolation -w wheels mamba-ssm==2.3.2.post1

slurm-up: ## start the project's single-node SLURM cluster on loopback (installs Debian packages if missing)
	bash launchers/slurm-up.sh

slurm-down: ## stop exactly what slurm-up started
	bash launchers/slurm-down.sh
