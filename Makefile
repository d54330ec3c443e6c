# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit chaos bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,otlp]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/walship demo

lint: $(STAMP)
	$(BIN)/ruff check producer consumer shared tests
	$(BIN)/ruff format --check producer consumer shared tests

# mypy cannot follow setuptools' editable-install finder, so it checks the
# packages through a symlinked tree named the way they are imported.
typecheck: $(STAMP)
	@mkdir -p $(VENV)/typecheck/walship
	@for p in producer consumer shared; do ln -sfn "$(CURDIR)/$$p" $(VENV)/typecheck/walship/$$p; done
	cd $(VENV)/typecheck && MYPYPATH=. ../bin/mypy --config-file "$(CURDIR)/pyproject.toml" \
		--namespace-packages --explicit-package-bases -p walship

# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
unit: $(STAMP)
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: lint typecheck unit

chaos: $(STAMP)
	$(BIN)/walship chaos --duration $${DURATION:-300} --seed $${SEED:-1}

bench: $(STAMP)
	$(BIN)/walship bench --out bench.json

bench-quick: $(STAMP)
	$(BIN)/walship bench --quick --min-ratio 3 --out bench-quick.json

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
