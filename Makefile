# Kairos: `make run` starts the whole suite on the embedded default; `make test` passes the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint format migrate bench clean faults openapi tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/kairos up

# pytest's exit code 5 (no tests collected) is a failure here, never a pass.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The fault suite at the issue's sizes (FAULTS_SCALE=1; `make test` runs it at 0.02); the
# figures go to bench/results/faults.json, `python -m tests.faults.table` renders them.
faults: install
	FAULTS_SCALE=$${FAULTS_SCALE:-1} FAULTS_OUT=$${FAULTS_OUT:-bench/results/faults.json} \
		$(PY) -m pytest tests/faults -v $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

migrate: install
	$(VENV)/bin/kairos migrate

bench: install
	$(PY) -m bench $(BENCH_ARGS)

# The gateway's OpenAPI document (the public contract), written to $(OPENAPI_FILE).
OPENAPI_FILE ?= openapi.json
openapi: install
	$(PY) -m gateway.openapi $(OPENAPI_FILE)

# Tools the tests use that are not Python packages, into .tools/ (Spectral, the OpenAPI linter).
SPECTRAL_VERSION ?= 6.16.3
tools: .tools/node_modules/.bin/spectral

.tools/node_modules/.bin/spectral:
	mkdir -p .tools
	npm install --no-audit --no-fund --silent --prefix .tools @stoplight/spectral-cli@$(SPECTRAL_VERSION)

clean:
	rm -rf .run $(VENV) .pytest_cache .mypy_cache .ruff_cache
