# The README's commands. `make demo` and `make test` do all set-up from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=
# `make container`: the image (Dockerfile). BASE_IMAGE / TORCH_INDEX: see the Dockerfile.
DOCKER      ?= /usr/bin/docker
IMAGE       ?= dmriflow:latest
BASE_IMAGE  ?= python:3.11-slim
TORCH_INDEX ?=

.PHONY: env demo test bench container clean

$(BIN)/dmriflow: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the pinned CPU build, so nothing pulls a CUDA wheel
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(BIN)/dmriflow

env: $(BIN)/dmriflow

demo: env
	$(BIN)/dmriflow demo $(DEMO_OUT)

test: env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: env
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

container: env
	# without TORCH_INDEX: the torch build this machine's pip resolves for the pin (the CPU
	# build here), which the image build prefers; with it, no local torch wheel
	mkdir -p build/wheels
	if [ -n "$(TORCH_INDEX)" ]; then rm -f build/wheels/torch-*.whl; else \
		$(BIN)/pip download --quiet --no-deps -d build/wheels -c constraints.txt torch; fi
	$(DOCKER) build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_INDEX=$(TORCH_INDEX) \
		-t $(IMAGE) .

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
