# lr-sweep: the README's two commands are `make sweep` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# Prefect's state for this checkout. Its other quiet, local defaults live in flows/environment.py;
# $(QUIET) runs a command with them.
export PREFECT_HOME ?= $(CURDIR)/.prefect
QUIET := $(BIN)/python -m flows.environment

.PHONY: install data sweep test test-slow lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Fashion-MNIST: Debian's package when apt is at hand (no internet needed), else torchvision's
# download at the first run.
data: install
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(BIN)/lr-sweep data

sweep: data
	$(BIN)/lr-sweep run

# The fast tests make their own data (synthetic IDX files): no dataset package needed.
test: install
	$(QUIET) $(BIN)/pytest --durations=10

lint: install
	$(BIN)/ruff check .

# Real Fashion-MNIST, the real server, SIGKILL and resume: the dataset package is installed first.
test-slow: data
	$(QUIET) $(BIN)/pytest -m slow --durations=10 || [ $$? -eq 5 ]  # 5: no slow test selected

clean:
	rm -rf runs registry exports .prefect .pytest_cache

# --- Deploy on a Prefect server (docs/deploy.md) ------------------------------------------------
# `make server` is the background server `make sweep` uses (one per checkout, .prefect/); the
# other targets talk to it, or to the server PREFECT_API_URL names. `make prefect-server` runs a
# server in the foreground instead, e.g. for a team on PostgreSQL (docs/deploy.md).
SERVER_HOST  ?= 127.0.0.1
SERVER_PORT  ?= 4200
PROCESS_POOL  := lr-sweep-process
GPU_POOL      := lr-sweep-gpu
# Docker pools are created from prefect-docker's template (see deploy/pools.py for why).
GPU_POOL_TEMPLATE := $(PREFECT_HOME)/docker-pool-template.json
# The registry GPU nodes pull the image from (`make deploy`), or the image `make deploy-prebuilt` uses.
LR_SWEEP_IMAGE_REPO ?= localhost:5000/lr-sweep
IMAGE ?=
# A JSON file of job variables that replace the GPU deployments' own (deploy/prebuilt.py), e.g.
# deploy/cpu-host.json for one machine without a GPU.
JOB_VARIABLES ?=
# A GPU worker's name keys its per-device concurrency limits: one stable name per node.
WORKER_NAME ?= $(shell hostname)
WORKER_LIMIT ?= 8
# The work queues a worker takes runs from (default: every queue of the pool), e.g. `trials`.
WORKER_QUEUES ?=

.PHONY: server serve prefect-server pools deploy deploy-local deploy-prebuilt worker gpu-worker
pools deploy deploy-local deploy-prebuilt worker gpu-worker: export PREFECT_API_URL ?= $(shell $(BIN)/lr-sweep server url 2>/dev/null)
deploy: export LR_SWEEP_IMAGE_REPO := $(LR_SWEEP_IMAGE_REPO)

server: install
	$(BIN)/lr-sweep server start

# The sweep as a deployment on the background server, run from the UI or its nightly schedule.
serve: install
	$(BIN)/lr-sweep serve

# A Prefect server in the foreground with its SQLite database in PREFECT_HOME; for production
# point PREFECT_API_DATABASE_CONNECTION_URL at PostgreSQL (docs/deploy.md) and PREFECT_API_URL
# at http://SERVER_HOST:SERVER_PORT/api for the other targets.
prefect-server: install
	$(QUIET) $(BIN)/prefect server start --host $(SERVER_HOST) --port $(SERVER_PORT)

pools: install
	$(QUIET) $(BIN)/prefect work-pool create $(PROCESS_POOL) --type process --overwrite
	mkdir -p $(PREFECT_HOME)
	$(BIN)/python -m deploy.pools docker-template $(GPU_POOL_TEMPLATE)
	$(QUIET) $(BIN)/prefect work-pool create $(GPU_POOL) --type docker --base-job-template $(GPU_POOL_TEMPLATE) --overwrite

# Every deployment; builds and pushes the image (needs a Docker engine and LR_SWEEP_IMAGE_REPO).
deploy: install
	$(QUIET) $(BIN)/prefect --no-prompt deploy --all

# The process-pool deployments only: no Docker anywhere. lr-sweep-export/export-local runs on every
# promotion (its trigger in prefect.yaml).
deploy-local: install
	$(QUIET) $(BIN)/prefect --no-prompt deploy --name lr-sweep/local --name lr-sweep-trial/trial-local --name lr-sweep-export/export-local

# The GPU deployments from an image built and pushed elsewhere: no Docker engine needed here.
deploy-prebuilt: install
	@test -n "$(IMAGE)" || { echo "usage: make deploy-prebuilt IMAGE=registry.example.com/lr-sweep:TAG"; exit 2; }
	mkdir -p $(PREFECT_HOME)
	$(BIN)/python -m deploy.prebuilt prefect.yaml $(IMAGE) $(if $(JOB_VARIABLES),--job-variables $(JOB_VARIABLES)) \
		> $(PREFECT_HOME)/prefect.prebuilt.yaml
	$(QUIET) $(BIN)/prefect --no-prompt deploy --prefect-file $(PREFECT_HOME)/prefect.prebuilt.yaml \
		--name lr-sweep/lr-sweep --name lr-sweep-trial/trial-gpu --name lr-sweep-export/export-docker

# Takes sweeps and trials from the process pool, running them from this checkout.
worker: install
	$(QUIET) $(BIN)/prefect worker start --pool $(PROCESS_POOL) --name $(WORKER_NAME)-process

# On a GPU node with Docker and the NVIDIA container toolkit: one worker per node.
gpu-worker: install
	$(QUIET) $(BIN)/prefect worker start --pool $(GPU_POOL) --type docker --name $(WORKER_NAME) --limit $(WORKER_LIMIT) \
		$(foreach queue,$(WORKER_QUEUES),--work-queue $(queue))

# --- The Docker worker on a machine without a GPU (README: "Docker worker without a GPU") -------
# The image on docker/base-image.sh's CPU base (built once per recipe, then reused), for machines
# that cannot pull pytorch/pytorch; behind a TLS-inspecting proxy give its CA certificate(s):
# `make image IMAGE=lr-sweep:local EXTRA_CA=proxy-ca.pem`. Needs root and a Docker engine.
EXTRA_CA ?=

.PHONY: image test-docker
image:
	@test -n "$(IMAGE)" || { echo "usage: make image IMAGE=lr-sweep:local [EXTRA_CA=proxy-ca.pem]"; exit 2; }
	docker/build-image.sh $(IMAGE) $(if $(EXTRA_CA),--extra-ca $(EXTRA_CA))

# The Docker worker end to end (tests/test_docker_e2e.py): needs root, a Docker engine and a
# PostgreSQL database in DOCKER_E2E_DATABASE_URL; docker/ci.sh sets up both and runs this.
test-docker: install
	$(QUIET) $(BIN)/pytest -m docker -s

# Our training engine against a DataLoader loop, the flow's overhead, peak memory,
# evaluation speed, in one run (about 5 minutes on 2 cores); figures go to $(BENCH_JSON).
BENCH_JSON ?= bench.json
export BENCH_JSON

# One tarball for a GPU node without internet (benchmarks/gpu_bundle.py): the project, the
# dependencies a node with Python, torch and torchvision lacks, built for PYTHON_VERSION, and
# Fashion-MNIST; run it there with `benchmarks/gpu_check.sh --bundle FILE`. NODE_PROVIDES names
# what the node has besides (e.g. "matplotlib" on the H200 image) to leave it out.
PYTHON_VERSION ?= 3.12
GPU_BUNDLE ?= dist/gpu-bundle.tar.xz
NODE_PROVIDES ?=

.PHONY: gpu-bundle
gpu-bundle: install
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi
	$(BIN)/python -m benchmarks.gpu_bundle --python-version $(PYTHON_VERSION) --output $(GPU_BUNDLE) \
		$(if $(NODE_PROVIDES),--node-provides $(NODE_PROVIDES))

.PHONY: bench bench-search
bench: data
	$(QUIET) $(BIN)/python -m benchmarks.bench --json $(BENCH_JSON)

# An image folder: lr-sweep's decoded-once cache against a plain torchvision ImageFolder +
# DataLoader(num_workers=2) loop, 2 epochs of the reference CNN on Fashion-MNIST written once as
# PNG files (about 5 minutes on 2 cores); figures go to $(BENCH_DATA_JSON).
BENCH_DATA_JSON ?= bench-data.json
export BENCH_DATA_JSON

.PHONY: bench-data
bench-data: data
	$(QUIET) $(BIN)/python -m benchmarks.bench_data --json $(BENCH_DATA_JSON)

# The full grid against successive halving and TPE, and the LR range test, on
# Fashion-MNIST (about 15-25 minutes on 2 cores); figures go to benchmarks/bench_search.json.
bench-search: data
	$(QUIET) $(BIN)/python -m benchmarks.bench_search --json benchmarks/bench_search.json
