# The two set-up commands of the README: `make demo` (run it end to end) and `make test`.
# Both install what they need first (uv, Python packages; node packages once there are any).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export UV_LINK_MODE := copy

.PHONY: install fmt lint typecheck test cov check migrate run demo postgres

install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

postgres:
	@scripts/postgres-up

fmt: install
	$(UV) run ruff format service tests alembic bench

lint: install
	$(UV) run ruff format --check service tests alembic bench
	$(UV) run ruff check service tests alembic bench

typecheck: install
	$(UV) run mypy

test: lint typecheck postgres
	$(UV) run pytest -q

cov: install postgres
	$(UV) run coverage run -m pytest -q && $(UV) run coverage report --fail-under=90

check: test

migrate: install
	$(UV) run pandasync migrate

run: install
	$(UV) run pandasync migrate && $(UV) run pandasync serve

demo: install
	$(UV) run pandasync demo
