# replicator: every setup step a fresh Debian machine needs lives here (CI runs a clean clone).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The distribution's Python when there is one: what a fresh Debian machine runs (the README's
# two commands), so what the tests must pass on, and built with PGO and LTO. On the build
# machine `python3` on PATH is a pyenv build without them (the engine's loop-bound paths ran
# 3-15% slower), and the tests passed there while Debian 12's 3.11.2 met a bug of its own
# (bench/RESULTS.md, "2026-12-02, 18:30").
# PYTHON=python3 (or any Python 3.11+) picks another; so does a distribution's older than 3.11.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            2>/dev/null && echo /usr/bin/python3 || echo python3)
# Some images set PYTHONDONTWRITEBYTECODE: then every `replicator` process (hundreds in the
# tests) compiles the package's modules again, ~0.25 s of CPU each. Let Python cache them.
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# Debian packages the tests and the demo drive for real (command:package).
SYSTOOLS := qemu-img:qemu-utils qemu-io:qemu-utils fio:fio nbdkit:nbdkit nbdcopy:libnbd-bin \
            nbdsh:python3-libnbd \
            rsync:rsync ip:iproute2 openssl:openssl fusermount3:fuse3 bindfs:bindfs \
            pkg-config:pkg-config gcc:gcc patch:patch systemd-analyze:systemd etcd:etcd-server \
            mkfs.ext4:e2fsprogs findmnt:util-linux \
            mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs faketime:faketime strace:strace
# headers pyfuse3 and the C fast paths (engine/nbd/_native.c, journal/_verify.c: xxhash.h) compile
# against (checked with pkg-config, so they are not commands)
SYSLIBS := fuse3:libfuse3-dev libxxhash:libxxhash-dev
PYTEST := $(PY) -bb -m pytest
PYFUSE3_VERSION := 3.5.0
PYFUSE3_SHA256 := 88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH := engine/fuse/pyfuse3.patch
PYFUSE3_LOCAL := $(PYFUSE3_VERSION)+replicator.3
PYFUSE3_BUILD := build/pyfuse3
PYFUSE3_STAMP := $(VENV)/.pyfuse3-$(PYFUSE3_LOCAL)

.PHONY: help install sysdeps rootcheck demo test test-long lint format typecheck bench clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

sysdeps: ## install the Debian packages replicator and its tests use, when missing (as root)
	@missing=""; for pair in $(SYSTOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	for pair in $(SYSLIBS); do lib=$${pair%%:*}; pkg=$${pair##*:}; \
	  pkg-config --exists $$lib 2>/dev/null || missing="$$missing $$pkg"; done; \
	inc=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	[ -f "$$inc/Python.h" ] || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing tools:$$missing (run as root, or: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

$(PY): | sysdeps
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	  else echo "python3 -m venv failed: install python3-venv (sudo apt-get install python3-venv)"; exit 1; fi; \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip

# pyfuse3 $(PYFUSE3_VERSION) registers no fallocate handler (a punched hole would reach the source
# as written zeros) and registers its fd with the event loop for every request. Until upstream
# has both, build it from its hash-checked PyPI sdist with $(PYFUSE3_PATCH), which says what
# it changes; the installed version says so too: $(PYFUSE3_LOCAL).
$(PYFUSE3_STAMP): $(PYFUSE3_PATCH) | $(PY)
	@rm -rf $(PYFUSE3_BUILD) && mkdir -p $(PYFUSE3_BUILD)
	@echo "pyfuse3==$(PYFUSE3_VERSION) --hash=sha256:$(PYFUSE3_SHA256)" > $(PYFUSE3_BUILD)/requirements.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes \
	  -r $(PYFUSE3_BUILD)/requirements.txt -d $(PYFUSE3_BUILD)
	tar -xzf $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION).tar.gz -C $(PYFUSE3_BUILD)
	patch -s -p1 -d $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION) < $(PYFUSE3_PATCH)
	SETUPTOOLS_SCM_PRETEND_VERSION=$(PYFUSE3_LOCAL) \
	  $(PY) -m pip install -q $(PYFUSE3_BUILD)/pyfuse3-$(PYFUSE3_VERSION)
	@touch $@

$(STAMP): pyproject.toml $(PYFUSE3_STAMP)
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	@touch $(STAMP)

install: $(STAMP) ## create .venv with an editable (strict) install and the dev tools
	@# strict editable installs map files one by one: reinstall so new modules are seen
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=strict
	@# and compile them: pip compiles what it installs, not an editable tree, and the venv's
	@# commands run outside make where PYTHONDONTWRITEBYTECODE is set (see the top) would
	@# compile ~150 modules at every start (a receiver listened after ~0.6 s, ~0.34 s
	@# compiled; bench/RESULTS.md, "forty-seventh session")
	@$(PY) -c 'import compileall, sys, replicator; \
	  sys.exit(not all(compileall.compile_dir(p, quiet=1, workers=0) for p in replicator.__path__))'

demo: sysdeps install ## replicate a real VHD over loopback, change it, replicate again, verify
	$(PY) bench/demo.py

# Most tests wait on the processes they start, so they run in parallel workers; the few
# that measure a rate or a deadline (marked serial) run alone afterwards. Workers steal
# queued tests from each other, so a worker that drew the long kill cycles last does not
# hold the run after the others have finished.
TEST_WORKERS ?= 3

# The tests mount FUSE file systems and make network namespaces: as another user they fail by
# the hundred, so say why once, before anything is installed.
rootcheck:
	@[ "$$(id -u)" = 0 ] || { echo "make test needs root: the tests mount FUSE file systems and make network namespaces (run: sudo make test)"; exit 1; }

test: rootcheck sysdeps install ## run the test suite (unit, property, integration, fault injection)
	$(PYTEST) -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal -m 'not long and not serial' && \
	  $(PYTEST) -q -p no:cacheprovider -m 'serial and not long'

test-long: rootcheck sysdeps install ## run the long soak tests as well
	$(PYTEST) -q -p no:cacheprovider -m '' --timeout 3600

lint: install ## ruff check and format check
	$(BIN)/ruff check engine transport journal cli tests bench
	$(BIN)/ruff format --check engine transport journal cli tests bench

format: install ## apply ruff formatting and fixes
	$(BIN)/ruff check --fix engine transport journal cli tests bench
	$(BIN)/ruff format engine transport journal cli tests bench

typecheck: install ## mypy --strict over the package, the tests and the benchmarks
	$(BIN)/mypy --strict engine transport journal cli tests bench --exclude 'bench/probes/'
	@# the sitecustomize probes share one module name, so one mypy run each
	for probe in bench/probes/*/sitecustomize.py bench/probes/*.py; do $(BIN)/mypy --strict $$probe || exit 1; done

bench: sysdeps install ## run the benchmarks and print figures side by side with their peers
	$(PY) bench/run_all.py

clean: ## remove the venv, caches and demo/bench output
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-work bench/out
