# Two commands on a fresh machine:  `make up` (the service)  and  `make test` (the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint format install clean

$(STAMP): pyproject.toml scripts/install_deps.sh
	bash scripts/install_deps.sh $(VENV) $(PY)
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/ldmserve up

test: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
