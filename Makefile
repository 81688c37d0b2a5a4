# attamba — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-all demo sweep figures paper-figures ui slurm-up slurm-down gpu-wheel clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev,eval]'
	# mistral-common only ships the SentencePiece model we test with; its deps are not needed
	$(PIP) install --quiet --no-deps mistral-common==1.13.1
	$(VENV)/bin/attamba-prepare-data --root runs/data
	touch $(STAMP)

install: $(STAMP) ## create .venv, install attamba (CPU torch) and prepare the embedded corpus

test: install ## run the test suite (fast tests; slow/gpu/slurm are opt-in markers)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-all: install ## run every CPU test, slow ones included
	$(VENV)/bin/pytest -m 'not gpu and not slurm' $(PYTEST_ARGS)

demo: install ## train a small real sweep on the embedded corpus, log to MLflow in runs/, draw figures
	$(VENV)/bin/attamba-train -m experiment=demo
	$(MAKE) --no-print-directory figures
	@echo
	@echo "Results: MLflow store $(TRACKING_URI) (experiment 'demo'), figures in runs/figures/demo/"
	@echo "(120 steps of tiny models on the embedded corpus: they show the pipeline, not the paper's comparison)"
	@echo "Browse them: make ui   (then open http://127.0.0.1:$(UI_PORT))"

EXPERIMENT ?= demo
TRACKING_URI ?= sqlite:///runs/mlflow.db
UI_PORT ?= 5000

sweep: install ## run a study through Hydra multirun (EXPERIMENT=demo|smoke|paper_iso_kv|leading_tokens|chunk_strategy)
	$(VENV)/bin/attamba-train -m experiment=$(EXPERIMENT)

figures: install ## rebuild every figure the tracking store supports into runs/figures/ and print the tables
	$(VENV)/bin/attamba-analyze all --tracking-uri $(TRACKING_URI) --out runs/figures

PAPER_RUNS ?= ../shared/data/attamba-paper-runs.tar.gz

paper-figures: install ## import the paper authors' Lingua logs (PAPER_RUNS=tarball) into runs/ and draw their figures
	rm -rf runs/paper-runs && mkdir -p runs/paper-runs && tar xzf $(PAPER_RUNS) -C runs/paper-runs
	for study in comparative_runs reported_runs long_runs; do \
		$(VENV)/bin/attamba-analyze import-lingua runs/paper-runs/*/$$study/* --experiment paper-$$study \
			--tracking-uri $(TRACKING_URI) || exit 1; \
	done
	$(VENV)/bin/attamba-analyze all --experiment paper-comparative_runs paper-reported_runs paper-long_runs \
		--tracking-uri $(TRACKING_URI) --out runs/figures

ui: install ## serve the tracking store with the MLflow UI on 127.0.0.1 only
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(UI_PORT) --workers 1

clean: ## remove the virtual environment and everything under runs/
	rm -rf $(VENV) runs/*

gpu-wheel: install ## build mamba-ssm's pure-Python wheel (Triton kernels, no CUDA build) into wheels/
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
	CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(PIP) wheel --no-deps --no-build-isolation -w wheels mamba-ssm==2.3.2.post1

slurm-up: ## start the project's single-node SLURM cluster on loopback (installs Debian packages if missing)
	bash launchers/slurm-up.sh

slurm-down: ## stop exactly what slurm-up started
	bash launchers/slurm-down.sh
