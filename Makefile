# Two entry points: `make run` (the main job) and `make test` (the whole suite).
# Both bootstrap .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CONSTRAINT ?= constraints/cpu.txt
ARGS ?=
MAIN_ARGS ?= --num-clients 3 --tiers 0,1,1

.PHONY: install run test clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINT)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(TORCH_CONSTRAINT) -e '.[dev]'
	touch $@

run: install
	$(BIN)/testnet start $(MAIN_ARGS) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
