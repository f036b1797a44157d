# livefuse developer entry points. A fresh clone on a machine with python3.11 needs only:
#   make test
# (`make install` creates .venv, installs livefuse with its dev extras, pulls the models
# into $LIVEFUSE_HOME/models and the test images into $LIVEFUSE_HOME/testdata).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when the dependencies change; models and fixtures are checked every time
# (cheap when present: sha256 against their records, no network).
INSTALL_STAMP := $(VENV)/.install-stamp

.PHONY: install models fixtures test lint format serve clean

install: $(INSTALL_STAMP) models fixtures

$(INSTALL_STAMP): pyproject.toml
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "could not create $(VENV) with $(PYTHON): on Debian's python3.11, apt-get install python3.11-venv"; \
	  exit 1; }
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -e '.[dev]'
	touch $@

models: $(INSTALL_STAMP)
	$(BIN)/livefuse models pull

fixtures: $(INSTALL_STAMP)
	$(BIN)/python -m tests.fixtures

test: install
	$(BIN)/pytest -q

lint: $(INSTALL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy livefuse

format: $(INSTALL_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: $(INSTALL_STAMP)
	@echo "livefuse serve arrives with the streaming service; until then, swap files:"
	@echo "  $(BIN)/livefuse swap --source FACE.jpg --target IMAGE|DIR|VIDEO --output PATH [--faces all|largest]"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
