# One entry point per job. Every target creates the virtual environment first if it is missing.
#   make serve   export the release checkpoint, verify it, pack model_store/ and start TorchServe
#   make test    the whole test suite (starts and stops its own TorchServe instances)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CIFAR10_ROOT ?= data
CHECKPOINT ?= training/release/resnet18_cifar10.pt
PYTEST_ARGS ?=
export CIFAR10_ROOT

.PHONY: venv train evaluate model-store grpc serve stop test test-fast loadtest sweep peers clean

# torch and torchvision go first and exactly pinned, so that no resolver ever picks another build.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

train: venv
	$(PY) -m training.train --preset cpu --data-dir $(CIFAR10_ROOT) --output-dir runs/cpu --half

evaluate: venv
	$(PY) -m training.evaluate $(CHECKPOINT) --data-dir $(CIFAR10_ROOT)

# Re-exported (and re-verified) only when the checkpoint, the exporter or the handler changed.
model-store: model_store/cifar10.mar
model_store/cifar10.mar: $(CHECKPOINT) $(wildcard export/*.py) handlers/cifar10_handler.py | venv
	$(PY) -m export --checkpoint $(CHECKPOINT) --data-dir $(CIFAR10_ROOT)

grpc: venv
	$(PY) -m handlers.grpc_stubs

serve: model-store grpc
	$(PY) -m handlers.server start

stop: venv
	$(PY) -m handlers.server stop

test: venv grpc
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv grpc
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

loadtest: venv
	$(PY) -m loadtest

# The two sweeps of docs/BENCHMARKS.md and docs/BENCHMARKS_MULTI_IMAGE.md (about 28 and 11 minutes).
sweep: venv model-store
	$(PY) -m loadtest sweep --batch-sizes 1 8 16 --pinning worker none --users 32 --run-time 20 --ceiling-seconds 5
	$(PY) -m loadtest sweep --batch-sizes 1 4 --images-per-request 8 --pinning worker none --users 16 --run-time 20 \
		--ceiling-seconds 5 --report-name benchmarks_multi_image

# TorchServe as shipped against LitServe and FastAPI/uvicorn on the same archive (docs/PEERS.md, about 15 min).
peers: venv model-store
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m loadtest peers --rounds 3 --users 16 --warm-up 10 --run-time 30

clean:
	rm -rf build model_store runs logs key_file.json
