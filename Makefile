# Two commands on a fresh machine:  `make up` (the service)  and  `make test` (the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test test-docker lint format install clean image

$(STAMP): pyproject.toml scripts/install_deps.sh
	bash scripts/install_deps.sh $(VENV) $(PY)
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/ldmserve up

test: $(STAMP)
	bash scripts/install_browser.sh
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/pytest

# The image built and run (needs a Docker engine: scripts/start_docker.sh installs and starts one).
test-docker: $(STAMP)
	$(BIN)/pytest -m docker -v --durations=0 tests/test_docker.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# ldmserve:latest from the Dockerfile: CUDA base + CUDA torch where the registry is reachable, else a
# local Debian base + the pinned CPU torch (scripts/build_image.sh, deploy/README.md).
image:
	bash scripts/build_image.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
