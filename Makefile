# Set-up and entry points. Everything a fresh machine needs is installed from here.
# The venv lives in .venv; `make demo` and `make test` create it when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.coreg-installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pip (not uv/poetry): it finds the matching torch/torchvision wheels; see pyproject.toml.
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# animal-mnist's metadata asks for tensorflow, which it does not need: install it without deps.
	$(BIN)/python -m pip install --quiet --no-deps animal-mnist==0.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/coreg pipeline run --local --config coreg/configs/digits.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true GIT_PYTHON_REFRESH=quiet $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
