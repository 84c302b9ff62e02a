# The two set-up commands of the README: `make demo` (run it end to end) and `make test`.
# Both install what they need first (scripts/install: uv, .venv from requirements.lock, npm ci).
SHELL := /bin/bash
BIN := .venv/bin
SOURCES := service tests alembic bench

.PHONY: install lock fmt lint typecheck test cov check migrate run demo postgres

install:
	@scripts/install

# Re-resolve the pins after editing pyproject.toml: uv.lock stays local, the hashed
# requirements.lock (no index addresses in it) is what gets committed and installed;
# docker/requirements.lock is its runtime part, what the image installs.
EXPORT := uv export --format requirements-txt --no-emit-project --frozen --no-header
lock:
	uv lock && $(EXPORT) --all-groups -o requirements.lock >/dev/null
	$(EXPORT) --no-dev -o docker/requirements.lock >/dev/null

postgres:
	@scripts/postgres-up

fmt: install
	$(BIN)/ruff format $(SOURCES)

lint: install
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# Two test processes (pytest-xdist): most tests wait on servers they started, so two share
# a 2-core machine well. Coverage is of those processes, combined (pytest-cov).
test: lint typecheck postgres
	$(BIN)/pytest -q --numprocesses 2 --cov --cov-report=
	$(BIN)/coverage report

cov: install
	$(BIN)/coverage report --no-skip-covered

check: test

migrate: install
	$(BIN)/pandasync migrate

run: install
	$(BIN)/pandasync migrate && $(BIN)/pandasync serve

demo: install
	$(BIN)/pandasync demo
