# One entry point per job. Every target creates the virtual environment first if it is missing.
#   make serve   export the release checkpoint, verify it, pack model_store/ and start TorchServe
#   make test    the whole test suite (starts and stops its own TorchServe instances)
# Ordinary runs write their reports to build/; only `make docs` rewrites the committed docs/EXPORT.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CIFAR10_ROOT ?= data
CHECKPOINT ?= training/release/resnet18_cifar10.pt
# make serve verifies every variant on this fixed stratified subset of the test set (plus the fp32
# accuracy floor on all of it); make verify, make docs and the tests verify on all 10,000 images.
SERVE_VERIFY_IMAGES ?= 1000
PYTEST_ARGS ?=
export CIFAR10_ROOT

.PHONY: venv train evaluate model-store verify docs grpc serve stop test test-fast loadtest sweep clean

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

# Re-exported and re-verified only when the checkpoint, a source that ends up in or decides the
# archives (export/, the handler, training/model.py, checkpoint.py, data.py), a library version or a
# setting changed: --skip-if-current compares their hash with model_store/export-stamp.json (see
# export/store.py), which unlike file times survives checkouts and copies.
EXPORT := $(PY) -m export --checkpoint $(CHECKPOINT) --data-dir $(CIFAR10_ROOT)
model-store: venv
	$(EXPORT) --verify-images $(SERVE_VERIFY_IMAGES) --skip-if-current

# Every variant verified on all 10,000 test images (a store verified so already is kept).
verify: venv
	$(EXPORT) --verify-images all --skip-if-current

# The committed export report: full verification plus CPU timings, written to docs/EXPORT.md and docs/export.json.
docs: venv
	$(EXPORT) --verify-images all --benchmark --report-dir docs

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

clean:
	rm -rf build runs logs key_file.json model_store/*.mar model_store/export-stamp.json
