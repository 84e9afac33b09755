# armoryd — two commands: `make demo` and `make test` (both install what is missing first).
SHELL := /bin/bash
SWIFT ?= swift
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := .build/debug

.PHONY: all bootstrap build demo lint format test test-swift test-python test-scale test-compat bench bench-lab bench-sync fuzz install clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(SWIFT) build

demo: build
	@bash scripts/demo.sh

# swift-format with the checked-in .swift-format: `make lint` checks, `make format` rewrites.
FORMATTED := Sources Tests Benchmarks/armory-bench Fuzz Package.swift
lint:
	$(SWIFT) format lint --strict --configuration .swift-format -r $(FORMATTED)

format:
	$(SWIFT) format format -i --configuration .swift-format -r $(FORMATTED)

test: build
	@bash scripts/bootstrap.sh --tests
	$(MAKE) lint
	$(MAKE) test-swift
	$(MAKE) test-python
	$(MAKE) test-scale

test-swift:
	$(SWIFT) test

# Three suites, three runs: each has its own conftest (fixtures of the same names). Tests/systemd
# boots a private systemd and installs the debug build inside it (docs/deployment.md, "The test bed").
# The restarts under load in Tests/python/test_resume.py end on another build of the daemon (the
# release one): an upgrade mid-stream.
test-python:
	$(SWIFT) build -c release --product armoryd
	ARMORY_BIN=$(abspath $(BIN)) ARMORY_OTHER_BIN=$(abspath .build/release) $(PY) -m pytest -q Tests/python
	ARMORY_BIN=$(abspath $(BIN)) $(PY) -m pytest -q clients/python/tests
	ARMORY_BIN=$(abspath $(BIN)) $(PY) -m pytest -q -rs Tests/systemd

# The lab deployment (deploy/testbed.py): PostgreSQL, an `mlflow server` on it and 4 armoryd
# hosts (network namespaces where the machine allows).
test-scale: build
	ARMORY_BIN=$(abspath $(BIN)) $(PY) -m pytest -q Tests/scale

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
	@bash scripts/bench.sh $(BENCH_ARGS)

# Aggregate throughput of 1, 2 and 4 lab hosts into a PostgreSQL-backed MLflow server.
bench-lab: bootstrap
	$(SWIFT) build -c release --product armoryd
	$(SWIFT) build -c release --product armoryctl
	$(PY) Benchmarks/lab_bench.py $(BENCH_ARGS)

# `armoryctl sync` into a private MLflow server: metrics/s and artifact MB/s next to raw calls.
bench-sync: bootstrap
	$(SWIFT) build -c release --product armoryd
	$(SWIFT) build -c release --product armoryctl
	$(PY) Benchmarks/sync_bench.py $(BENCH_ARGS)

# Binaries, systemd units (system and user), the sysusers entry, the sample configuration and the
# docs, under PREFIX (default /usr/local) and DESTDIR. CONFIGURATION=debug installs the debug build.
PREFIX ?= /usr/local
DESTDIR ?=
CONFIGURATION ?= release
SYSCONFDIR ?= /etc
BINDIR := $(PREFIX)/bin
UNITDIR := $(PREFIX)/lib/systemd/system
USERUNITDIR := $(PREFIX)/lib/systemd/user
SYSUSERSDIR := $(PREFIX)/lib/sysusers.d
DOCDIR := $(PREFIX)/share/doc/armoryd
UNIT_PATHS := sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/usr/local/share/doc/armoryd|$(DOCDIR)|g' -e 's|/etc/armory/|$(SYSCONFDIR)/armory/|g'

install:
	$(SWIFT) build -c $(CONFIGURATION) --product armoryd
	$(SWIFT) build -c $(CONFIGURATION) --product armoryctl
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(USERUNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/armory
	install -m 0755 .build/$(CONFIGURATION)/armoryd .build/$(CONFIGURATION)/armoryctl $(DESTDIR)$(BINDIR)/
	for unit in armoryd.service armoryd.socket; do \
	  $(UNIT_PATHS) systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit && chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit; \
	  $(UNIT_PATHS) systemd/user/$$unit > $(DESTDIR)$(USERUNITDIR)/$$unit && chmod 0644 $(DESTDIR)$(USERUNITDIR)/$$unit; \
	done
	install -m 0644 systemd/armoryd.sysusers $(DESTDIR)$(SYSUSERSDIR)/armoryd.conf
	install -m 0644 README.md proto/PROTOCOL.md $(DESTDIR)$(DOCDIR)/
	install -m 0644 systemd/armoryd.conf $(DESTDIR)$(DOCDIR)/armoryd.conf.example
	[ -e $(DESTDIR)$(SYSCONFDIR)/armory/armoryd.conf ] || install -m 0644 systemd/armoryd.conf $(DESTDIR)$(SYSCONFDIR)/armory/armoryd.conf
	@echo "installed under $(DESTDIR)$(PREFIX); next: systemd-sysusers && systemctl daemon-reload && systemctl enable --now armoryd.socket"

clean:
	rm -rf .build
