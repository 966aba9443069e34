# Two entry points for a fresh machine (Python 3.11 and the package registries only):
#   make release-demo   install everything, then release the built-in tiny five-size family
#   make test           install everything, then run the tests
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qatgguf-installed

.PHONY: install llama-tools release-demo test bench clean-runs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk, never the multi-GB CUDA one
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# metadata a build of the repo root once left there: run from the root, it would hide
	# the installed entry points (the release and nightly subcommands)
	@rm -rf qatgguf.egg-info
	@touch $(STAMP)

install: $(STAMP)

# llama.cpp's tools (llama-perplexity, llama-quantize, llama-gguf-split), built once per
# machine from the installed llama-cpp-python's sources, run against its libraries: the
# tests' oracle for every number llama.cpp computes
llama-tools: $(STAMP)
	$(BIN)/python -m qatgguf.llamacpp

release-demo: $(STAMP)
	$(BIN)/qatgguf release tiny-family

test: llama-tools
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/eval.py

clean-runs:
	rm -rf runs
