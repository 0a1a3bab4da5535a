# Every target creates the virtual environment and installs what it needs (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo run test lint bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Main job: the offline demo (scripted model on loopback, real codex, real A2A client).
demo: $(STAMP)
	$(BIN)/molecule-codex demo

## Serve A2A against the configured provider (needs OPENAI_API_KEY or CODEX_AUTH_JSON).
run: $(STAMP)
	$(BIN)/molecule-codex serve

## The test suite: lint, then every test (real codex binary included).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/run.py

soak: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m soak --soak tests/

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
