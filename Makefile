# The README's commands. `make demo` and `make test` do all set-up from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: env demo test bench clean

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

clean:
	rm -rf $(VENV) $(DEMO_OUT) *.egg-info
