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
, := ,
export CIFAR10_ROOT

.PHONY: venv train evaluate model-store verify docs grpc serve stop test test-fast test-endurance loadtest sweep faults soak hostile peers profile first-run replicas rollout image image-test clean

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
	$(PY) -m clients.grpc_stubs

serve: model-store grpc
	$(PY) -m server start

stop: venv
	$(PY) -m server stop

# The store is built (and verified on all 10,000 images) before pytest starts, so that its time is not
# charged to the first test's timeout; the tests' model_store fixture then finds it current.
test: venv grpc verify
	$(PY) -m pytest -m "not endurance" $(PYTEST_ARGS)

test-fast: venv grpc verify
	$(PY) -m pytest -m "not slow and not endurance" $(PYTEST_ARGS)

# Tests that wait for real time to pass (keys expiring under load); CI runs them after make test.
test-endurance: venv grpc verify
	$(PY) -m pytest -m endurance $(PYTEST_ARGS)

loadtest: venv
	$(PY) -m loadtest

# The two sweeps of docs/BENCHMARKS.md and docs/BENCHMARKS_MULTI_IMAGE.md (about 28 and 11 minutes).
sweep: venv model-store
	$(PY) -m loadtest sweep --batch-sizes 1 8 16 --pinning worker none --users 32 --run-time 20 --ceiling-seconds 5
	$(PY) -m loadtest sweep --batch-sizes 1 4 --images-per-request 8 --pinning worker none --users 16 --run-time 20 \
		--ceiling-seconds 5 --report-name benchmarks_multi_image

# Worker killed and hung under steady Locust load: recovery time, failed requests (about 3 minutes).
faults: venv model-store
	$(PY) -m loadtest faults --report-dir docs

# Replicas behind a front HAProxy under Locust load: a SIGTERM, a replica added and the client key rotated,
# a bad and a good model update, a rolling replacement (docs/REPLICAS.md, about 10 minutes; needs Debian's haproxy).
replicas: venv model-store grpc
	$(PY) -m loadtest replicas --report-dir docs

# A model update on the running replica (its model API enabled): register ARCHIVE (a .mar in its model store) as a
# new version, check it on held-out test images, make it the default, drain and unregister the old one
# (clients/rollout.py). KEY_FILE: the replica's key_file.json (in the container: /var/lib/torchserve/key_file.json).
KEY_FILE ?= key_file.json
rollout: venv grpc
	test -n "$(ARCHIVE)" || { echo "usage: make rollout ARCHIVE=model_store/cifar10_v2.mar [KEY_FILE=...]"; exit 2; }
	$(PY) -m clients.rollout --archive $(ARCHIVE) --key-file $(KEY_FILE) --data-dir $(CIFAR10_ROOT)

# Memory soak: 10 minutes of steady load, frontend and worker RSS growth per 100k requests.
soak: venv model-store
	$(PY) -m loadtest soak --minutes 10 --report-dir docs

# Inputs that cost work beyond their pixels, sent beside steady good traffic for 2 minutes: refusals,
# good requests' p99 and failures, worker restarts (docs/HOSTILE.md).
hostile: venv model-store
	$(PY) -m loadtest hostile --minutes 2 --report-dir docs

# A fresh clone of HEAD timed to its first correct prediction (docs/FIRST_RUN.md; target 300 s).
# It serves on the shipped ports: stop any running server first.
first-run: venv
	$(PY) -m loadtest first-run

# The container image (Dockerfile, docs/DEPLOY.md). CIFAR-10 is staged into the build context as hard
# links (a copy across file systems) for the export stage only; EXTRA_CA=FILE hands pip a proxy's CA
# as a build secret; BASE_IMAGE picks the Debian base. Build time and size go to build/image/image.json.
DOCKER ?= docker
IMAGE ?= cifar10-serve:latest
BASE_IMAGE ?= debian:bookworm-slim
DOCKER_BUILD_ARGS ?=
image:
	test -f $(CIFAR10_ROOT)/cifar-10-batches-py/test_batch
	rm -rf build/image/cifar10 && mkdir -p build/image/cifar10
	cp -rl $(CIFAR10_ROOT)/cifar-10-batches-py build/image/cifar10/ 2>/dev/null \
		|| cp -r $(CIFAR10_ROOT)/cifar-10-batches-py build/image/cifar10/
	start=$$(date +%s); \
	DOCKER_BUILDKIT=1 $(DOCKER) build --tag $(IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
		--build-arg CIFAR10_DIR=build/image/cifar10 $(if $(EXTRA_CA),--secret id=extra_ca$(,)src=$(EXTRA_CA)) \
		$(DOCKER_BUILD_ARGS) . ; \
	status=$$?; seconds=$$(( $$(date +%s) - start )); rm -rf build/image/cifar10; test $$status -eq 0 && \
	printf '{"image": "%s", "base_image": "%s", "build_seconds": %d, "size_bytes": %s}\n' "$(IMAGE)" \
		"$(BASE_IMAGE)" $$seconds $$($(DOCKER) image inspect -f '{{.Size}}' $(IMAGE)) | tee build/image/image.json

# Runs the built image and talks to it on 127.0.0.1 only (tests/test_image.py).
image-test: venv grpc
	CIFAR10_TEST_IMAGE=$(IMAGE) DOCKER=$(DOCKER) $(PY) -m pytest tests/test_image.py $(PYTEST_ARGS)

# TorchServe as shipped against FastAPI/uvicorn, LitServe, Ray Serve and BentoML on the same archive, loaded by
# Locust and then by wrk (docs/PEERS.md, about 45 min). wrk is Debian's: apt-get install wrk.
peers: venv model-store
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m loadtest peers --rounds 3 --users 16 --warm-up 60 --run-time 30 --wrk-time 30

# Where TorchServe's CPU goes per answer, under wrk: JFR samples the frontend, py-spy the workers
# (docs/PROFILE.md, about 3 min).
profile: venv model-store
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m loadtest profile

clean:
	rm -rf build runs logs key_file.json model_store/*.mar model_store/export-stamp.json
