# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: run test setup lint format bench bench-metrics bench-sentry bench-alerts clean

$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ensureadmin

run: setup
	PORT=$(PORT) $(BIN)/python manage.py serve

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.dev
	$(BIN)/python bench/ingest.py

bench-metrics: $(VENV)/.dev
	$(BIN)/python bench/metrics.py

bench-sentry: $(VENV)/.dev
	$(BIN)/python bench/sentry.py

bench-alerts: $(VENV)/.dev
	$(BIN)/python bench/alerts.py

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
