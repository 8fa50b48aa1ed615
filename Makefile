# Every target creates the virtualenv when it is missing or older than pyproject.toml.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PG15 := /usr/lib/postgresql/15/bin/postgres

.PHONY: demo test test-pg15 lint bench db-stop clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 or newer is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# Bytecode as an installed package has it, even where PYTHONDONTWRITEBYTECODE is set: each `sync`
# process otherwise compiles the tool's modules again (a quarter of a second of its start-up).
BYTECODE := $(PY) -m compileall -q sync devkit bench

demo: $(STAMP)
	@$(BYTECODE)
	$(PY) -m sync demo

# The suite runs on the embedded PostgreSQL 18, then again on PostgreSQL 15 when its binaries are
# installed (Supabase runs 15 and 17). With DATABASE_URL set, it runs once, against that server.
# Tests run TEST_JOBS at a time (most of a test's time is spent waiting on servers and subprocesses);
# each has databases of its own, so they do not see one another.
TEST_JOBS ?= 3
PYTEST := $(PY) -m pytest -n $(TEST_JOBS) --dist loadgroup
test: $(STAMP)
	@$(BYTECODE)
	$(PYTEST)
	@if [ -z "$$DATABASE_URL" ] && [ -x $(PG15) ]; then \
		echo "== again on PostgreSQL 15 =="; SYNC_PG=15 $(PYTEST); fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# make bench SCALE=100 ROUNDS=1: another scale, a quicker look.
SCALE ?= 10
ROUNDS ?= 3
bench: $(STAMP)
	@$(BYTECODE)
	$(PY) -m bench --scale $(SCALE) --rounds $(ROUNDS)

db-stop: $(STAMP)
	$(PY) -m devkit.embedded stop

clean: db-stop
	rm -rf .pg
