# armoryd — two commands: `make demo` and `make test` (both install what is missing first).
SHELL := /bin/bash
SWIFT ?= swift
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := .build/debug

.PHONY: all bootstrap build demo test test-swift test-python test-compat bench fuzz clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(SWIFT) build

demo: build
	@bash scripts/demo.sh

test: build
	$(MAKE) test-swift
	$(MAKE) test-python

test-swift:
	$(SWIFT) test

# Two suites, two runs: each has its own conftest (fixtures of the same names).
test-python:
	ARMORY_BIN=$(abspath $(BIN)) $(PY) -m pytest -q Tests/python
	ARMORY_BIN=$(abspath $(BIN)) $(PY) -m pytest -q clients/python/tests

# Unmodified MLflow-using libraries (Lightning's MLFlowLogger) through armoryd://: torch is large,
# so this is not part of `make test`.
test-compat: build
	@bash scripts/compat.sh

# libFuzzer targets (frame decoders, message decoder, journal scan): FUZZ_SECONDS per target
# (default 60), then the corpus replayed under AddressSanitizer.
fuzz: bootstrap
	@bash scripts/fuzz.sh

# Benchmarks: release build, figures next to baselines measured in the same run.
bench: bootstrap
	@bash scripts/bench.sh

clean:
	rm -rf .build
