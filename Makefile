# gradstream: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: the CUDA build where a GPU is, else the CPU build (a local wheel when the
# machine has one, PyTorch's CPU index otherwise): never CUDA wheels without a GPU.
TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU_INDEX ?= $(if $(wildcard /opt/wheels/torch-*),,--index-url https://download.pytorch.org/whl/cpu)
TORCH_ARGS := $(if $(HAS_GPU),,$(TORCH_CPU_INDEX))
STAMP := $(VENV)/.installed
SERVER_STAMP := $(VENV)/.server
DIST ?= dist
BUF := .tools/node_modules/.bin/buf
PROTO_OUT ?= proto

.PHONY: install demo serve dist test lint format proto dashboard tools bench images image-test mutate clean

# The server extra alone (torch and the service): enough for `make demo` and `make serve`.
$(SERVER_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_ARGS) '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[server]'
	touch $@

# Everything the tests and linters use, on top.
$(STAMP): $(SERVER_STAMP)
	$(BIN)/python -m pip install -q -e '.[server,dev]'
	touch $@

install: $(STAMP)

# buf (npm @bufbuild/buf ships the binary) for `buf lint`; skipped where npm is missing.
tools: $(BUF)
$(BUF):
	@if command -v npm >/dev/null; then npm install --silent --prefix .tools @bufbuild/buf@1.75.0; \
	else echo "npm not found: buf lint will be skipped"; fi

demo: $(SERVER_STAMP)
	$(BIN)/gradstream demo

# A server on the default ports (loopback); more flags: make serve ARGS='--checkpoint-dir ckpt'
serve: $(SERVER_STAMP)
	$(BIN)/gradstream serve $(ARGS)

# The wheel (client, server, benchmarks, stubs) in $(DIST)/: pip install it, with '[server]' on
# the server's machine.
dist: install
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w $(DIST) .

test: install tools
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy client server tests benchmarks tools examples

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate the committed stubs (tests/unit/test_proto.py checks they are current).
proto: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_grpc_out=$(PROTO_OUT) proto/gradstream/v1/trainer.proto \
	  proto/gradstream/internal/v1/ingest.proto 2>/dev/null

# Regenerate the committed Grafana dashboard (tests/tools/test_dashboard.py checks it).
dashboard: install
	$(BIN)/python -m tools.dashboard deploy/grafana/dashboards/gradstream.json

bench: install
	$(BIN)/gradstream bench

# Container images (deploy/Dockerfile): the CPU and the CUDA target, tagged VERSION-cpu and
# VERSION-cuda as the kustomize overlays expect. Docker where its engine answers, else podman
# (docker format: the OCI format drops the HEALTHCHECK).
IMAGE ?= gradstream
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
ENGINE_FLAGS = $(if $(filter podman,$(notdir $(ENGINE))),--format docker)
images:
	$(ENGINE) build $(ENGINE_FLAGS) -f deploy/Dockerfile --target cpu -t $(IMAGE):$(VERSION)-cpu .
	$(ENGINE) build $(ENGINE_FLAGS) -f deploy/Dockerfile --target cuda -t $(IMAGE):$(VERSION)-cuda .

# Build the cpu image with podman on a local Debian base and run it as docs/deploy.md says
# (tests/deploy/test_image.py); installs podman with apt where it can, skips where it cannot.
image-test: install
	GRADSTREAM_IMAGE_TEST=1 $(BIN)/python -m pytest -q -rs -s --durations=3 -p no:cacheprovider tests/deploy/test_image.py

# Mutation testing of the training and admission core (docs/testing.md): mutmut, one worker,
# prints the score. Slow (tens of minutes); not part of `make test` or CI.
mutate: install
	$(BIN)/python -m tools.mutate

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache dist .mutate
