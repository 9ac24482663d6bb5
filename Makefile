# The README's commands. `make demo` and `make test` do all set-up from nothing.
#
# One lock for everything: requirements.lock pins every runtime and test dependency
# (transitive ones included) with sha256 hashes for CPython 3.11 on linux x86_64. The
# venv, CI (.ci/run -> make test) and the Dockerfile install from it and nothing else.
# `make lock` regenerates it from setup.cfg (+ constraints.txt) with uv's compile.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=
# where the pinned CPU torch wheel lies (a find-links folder); used when it exists
TORCH_WHEELS ?= /opt/wheels
FIND_TORCH := $(if $(wildcard $(TORCH_WHEELS)/torch-*.whl),--find-links $(TORCH_WHEELS))
# the lock tool, itself pinned; it lives in its own throwaway venv
UV_PIN    := uv==0.13.9
LOCK_TOOLS := build/lock-tools
LOCK_ARGS := --extra test --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 -c constraints.txt \
	--custom-compile-command "make lock"
# `make check-latest`: a throwaway venv with the newest versions setup.cfg allows
LATEST ?= build/latest
LATEST_TESTS ?= -m "not system" -q --deselect tests/test_environment.py::test_this_environment_is_the_lock
# `make container`: the image (Dockerfile). BASE_IMAGE / TORCH_INDEX: see the Dockerfile.
DOCKER      ?= /usr/bin/docker
IMAGE       ?= dmriflow:latest
BASE_IMAGE  ?= python:3.11-slim
TORCH_INDEX ?=

.PHONY: env demo test bench lock lock-upgrade check-latest container clean

# The venv holds exactly the lock: made anew when the lock changed since it was built
# (its sha256 is kept in the venv), so no package of an older lock stays behind.
$(BIN)/dmriflow: $(LOCK) setup.cfg pyproject.toml
	if [ -d $(VENV) ] && ! sha256sum --status -c $(VENV)/lock.sha256 2>/dev/null; then \
		echo "$(LOCK) changed: making $(VENV) anew"; rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(FIND_TORCH) --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	sha256sum $(LOCK) > $(VENV)/lock.sha256
	touch $(BIN)/dmriflow

# The editable install leaves the package's own modules uncompiled, and with
# PYTHONDONTWRITEBYTECODE set (as on this machine) Python compiled all of them
# again in every process: 0.15-0.35 s of every command. compileall writes them
# (only what changed since); a stale file is recompiled in memory, never used.
# MP-PCA's compiled kernels (numba) are built once into the same __pycache__
# (~1.5-2.8 s; loading them later takes ~0.2 s).
env: $(BIN)/dmriflow
	$(BIN)/python -m compileall -q interfaces pipelines models
	$(BIN)/python -c "from dmriflow.interfaces.mppca_split import compile_split; compile_split()"

demo: env
	$(BIN)/dmriflow demo $(DEMO_OUT)

test: env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: env
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

$(LOCK_TOOLS)/bin/uv:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install --quiet $(UV_PIN)

# Keeps the pins already in the lock where they still satisfy setup.cfg (add a
# dependency: only it and what it needs are resolved anew).
lock: $(LOCK_TOOLS)/bin/uv
	$(LOCK_TOOLS)/bin/uv pip compile setup.cfg $(LOCK_ARGS) $(FIND_TORCH) -o $(LOCK)

# Every pin to the newest version allowed. A deliberate commit: run the whole suite.
lock-upgrade: $(LOCK_TOOLS)/bin/uv
	$(LOCK_TOOLS)/bin/uv pip compile setup.cfg $(LOCK_ARGS) $(FIND_TORCH) --upgrade -o $(LOCK)

# The drift canary: today's newest releases (torch stays the pinned CPU build: a newer
# one is a multi-GB CUDA download), then the demo and the fast tests. Never used by CI's
# verdict (.ci/run prints its outcome); a failure here is an upstream change to fix on
# purpose, then `make lock-upgrade`.
check-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip setuptools
	grep '^torch==' constraints.txt > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/pip install --quiet --upgrade $(FIND_TORCH) -c $(LATEST)/torch-pin.txt -e '.[test]'
	$(LATEST)/bin/pip check
	@echo "check-latest: versions that differ from $(LOCK):"
	@$(LATEST)/bin/python -m dmriflow.interfaces.environment $(LOCK)
	$(LATEST)/bin/dmriflow demo $(LATEST)/demo --quiet
	$(LATEST)/bin/python -m pytest $(LATEST_TESTS) -p no:cacheprovider

container: env
	# without TORCH_INDEX: the locked torch wheel from the local wheel folder, which the
	# image build prefers; with it, no local torch wheel
	mkdir -p build/wheels
	if [ -n "$(TORCH_INDEX)" ]; then rm -f build/wheels/torch-*.whl; else \
		$(BIN)/pip download --quiet --no-deps $(FIND_TORCH) -d build/wheels \
		"$$(grep -o '^torch==[^ ]*' $(LOCK))"; fi
	$(DOCKER) build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_INDEX=$(TORCH_INDEX) \
		-t $(IMAGE) .

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(LATEST) $(LOCK_TOOLS) *.egg-info
