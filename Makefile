# Quick start: `make demo` and `make test`. Each does the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build comes from local files on CPU machines; on a GPU host the same pin takes PyPI's CUDA build.
TORCH_SPEC ?= torch==2.13.0
APT_PACKAGES := orthanc orthanc-dicomweb orthanc-gdcm dcmtk dicom3tools chromium libpixelmed-java default-jre-headless
# The OHIF Viewer the viewer test serves (tests/worker/test_viewer_ohif.py): the prebuilt dist of the pinned
# @ohif/app release from the npm registry, kept outside the repository.
OHIF_VERSION := $(shell cat tests/worker/OHIF_VERSION)
OHIF_DIR ?= $(HOME)/.cache/ccfnet-worker/ohif-$(OHIF_VERSION)
PYTEST_ARGS ?=

.PHONY: venv system-deps ohif services lint typecheck test test-fast demo clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# Real peers for the integration tests: Orthanc (PACS), DCMTK, dicom3tools. Installed only when missing.
system-deps:
	@missing=""; \
	for tool in storescu dciodvfy Orthanc chromium java; do command -v $$tool >/dev/null 2>&1 || missing=1; done; \
	test -f /usr/share/java/pixelmed.jar || missing=1; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else echo "note: install $(APT_PACKAGES) for the integration tests (they skip without them)"; fi; \
	fi

ohif: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html:
	@if command -v npm >/dev/null 2>&1; then \
	  mkdir -p $(OHIF_DIR) && cd $(OHIF_DIR) && rm -rf dist dist.part && mkdir dist.part && \
	  npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && \
	  tar xzf ohif-app-$(OHIF_VERSION).tgz -C dist.part --strip-components=2 package/dist && \
	  rm -f ohif-app-$(OHIF_VERSION).tgz && mv dist.part dist; \
	else echo "note: install node/npm for the OHIF viewer test (it skips without the dist)"; fi

# PostgreSQL and Redis run before every session and CI; start them if they are down.
services:
	@pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 || \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || \
	  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
	    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true

lint: venv
	$(BIN)/ruff check ccfnet_core worker tests bench migrations

typecheck: venv
	$(BIN)/mypy

test: venv system-deps ohif services lint typecheck
	CCFNET_OHIF_DIR=$(OHIF_DIR) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: venv
	$(BIN)/ccfnet demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache var runs
