# PersonaNet: `make run` and `make test` set everything up from a bare Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/persona.toml
# A throwaway key for the bundled sample; real data brings its own (PERSONANET_KEY_FILE).
DEMO_KEY := .personanet/demo.key

.DEFAULT_GOAL := help
.PHONY: help install dev run run-forms test lint bench clean-artifacts

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned: this machine serves 2.13.0 as a local CPU wheel, so a later
# `torch>=2.6` requirement is already met and no multi-GB CUDA build is downloaded.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install personanet

dev: $(VENV)/.installed-dev ## install with the test and lint tools

$(DEMO_KEY): | $(VENV)/.installed
	@mkdir -p $(dir $@)
	$(BIN)/personanet keys generate $@

run: install $(DEMO_KEY) ## run the whole pipeline on the bundled sample
	PERSONANET_KEY_FILE=$${PERSONANET_KEY_FILE:-$(DEMO_KEY)} $(BIN)/personanet --config $(CONFIG) run

run-forms: ## run the whole pipeline on the bundled image sample (configs/forms.toml)
	$(MAKE) run CONFIG=configs/forms.toml

# scripts/pg-scratch starts a throwaway PostgreSQL (initdb in a temporary folder, a loopback
# port), exports PERSONANET_TEST_PG_URI for the database tests, and stops it afterwards.
test: dev ## run the whole test suite (slow tests included) beside a scratch PostgreSQL
	scripts/pg-scratch run $(BIN)/python -m pytest -q

lint: dev ## ruff, and the layer rules of docs/architecture.md (import-linter)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

bench: dev ## run the benchmarks (ratios measured side by side)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-artifacts: ## delete ./artifacts, budget ledger included (spent budget is forgotten)
	rm -rf artifacts
