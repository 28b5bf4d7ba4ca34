# bmsync: `make demo` and `make test` set everything up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_TOOLS := docker-registry skopeo containerd ctr zstd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system venv demo test test-slow bench lint clean

install: system venv
	@# Byte-compile: with PYTHONDONTWRITEBYTECODE set, every start would recompile.
	@$(BIN)/python -m compileall -q pipeline tasks >/dev/null

# System packages: installed only when one of their commands is missing.
system:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y docker-registry skopeo containerd zstd; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python -m tests.demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	@command -v rclone >/dev/null || { $(SUDO) apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y rclone; }
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check pipeline tasks tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-work bench-work
