# Set-up and the main commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo data test test-fast lint serve ui clean
PORT ?= 5001
UI_PORT ?= 5000

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,auth,spark]'
	touch $(STAMP)

# Raw data: the real C-NMC set if you put it in data/, else the embedded demo set.
data: install
	@if [ ! -d data ]; then \
		$(BIN)/cnmc demo-data data && $(BIN)/dvc add --quiet data; \
	else echo "data/ exists: using it"; fi

demo: data
	$(BIN)/dvc repro
	@echo "The comparison (printed by the report stage): outputs/report/comparison.md; the champion's card: registry/model_card.md"

# Two workers (pytest-xdist): CI's two cores; TEST_WORKERS=auto uses every core. They steal work from each
# other, and tests/conftest.py hands out the longest tests first, so both finish together. Coverage of src/cnmc
# in the test processes is printed, and the run fails below the floor (89% measured when it was set).
TEST_WORKERS ?= 2
COVERAGE_FLOOR ?= 88
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --cov --cov-report=term:skip-covered --cov-fail-under=$(COVERAGE_FLOOR)

# The loop while you work: everything but the tests marked slow (end to end, subprocesses, servers).
test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# What CI checks besides the tests: lint, formatting and types (mypy on src/, settings in pyproject.toml).
lint: install
	$(BIN)/ruff check src tests bench docs scripts
	$(BIN)/ruff format --check src tests bench docs scripts
	$(BIN)/python -m mypy

# Serve the registered champion (params.yaml: promote) over HTTP on 127.0.0.1:$(PORT) (docs/serving.md).
serve: install
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db $(BIN)/cnmc serve --port $(PORT)

# The MLflow UI on the project's runs: open http://127.0.0.1:$(UI_PORT) (docs/pipeline.md: comparing backbones).
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

clean:
	rm -rf outputs dvc.lock .dvc/tmp
