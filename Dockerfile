# syntax=docker/dockerfile:1
# The lr-sweep flows in a CUDA image. A Docker worker starts a container from it for each flow run
# and runs `prefect flow-run execute` in /opt/lr-sweep, the same code path as a process worker.
#
# Base: the official PyTorch runtime image whose torch is pyproject.toml's pin (torch 2.14.1 on
# CUDA 13.0 and cuDNN 9, system Python 3.12), so pip keeps its torch instead of downloading a
# second one. Pinned by tag here; for reproducible builds append its digest once you have pulled
# it: `docker buildx imagetools inspect pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime`, then
# --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime@sha256:<digest>.
# Where no registry serves it, docker/base-image.sh builds an equivalent CPU base from Debian
# packages and the package index (Python 3.11, torch in /opt/venv): docker/build-image.sh builds
# both (README, "Docker worker without a GPU").
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    WANDB_SILENT=true \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /opt/lr-sweep

# Behind a TLS-inspecting proxy pip must trust the proxy's CA: pass its certificate(s) as PEM text,
# --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.pem)". pip trusts them besides its own bundle during
# the pip steps below (deploy/pip-ca.sh); no file of the image keeps them. A private index works
# the same way: --build-arg PIP_INDEX_URL=https://pypi.example/simple. Build arguments are
# recorded in `docker history`: a CA certificate is public, but never pass a password or a token
# this way. README, "Docker worker without a GPU".
ARG EXTRA_CA_CERTS=
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

# Dependencies first, from pyproject.toml's own list (no second copy of the pins): this layer is
# rebuilt only when pyproject.toml changes. `check` fails the build unless every installed
# version, the base image's torch included, is the one pyproject.toml asks for.
COPY pyproject.toml ./
COPY deploy/pins.py deploy/pip-ca.sh /usr/local/share/lr-sweep/
RUN python3 /usr/local/share/lr-sweep/pins.py requirements pyproject.toml > /tmp/requirements.txt \
 && /usr/local/share/lr-sweep/pip-ca.sh python3 -m pip install -r /tmp/requirements.txt \
 && python3 /usr/local/share/lr-sweep/pins.py check pyproject.toml

# A non-root user owns the directories the deployments mount volumes on; a fresh named volume
# copies that owner, so the flow can write its dataset cache, registry and outputs there.
RUN useradd --create-home --uid 10001 --user-group lrsweep \
 && mkdir -p data registry runs \
 && chown lrsweep:lrsweep data registry runs

# The code last: editing it rebuilds only these layers. --no-deps: the dependencies are above.
COPY README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY models ./models
RUN /usr/local/share/lr-sweep/pip-ca.sh python3 -m pip install --no-deps . && rm -rf build ./*.egg-info

USER lrsweep
# A Docker worker replaces this with `prefect flow-run execute`; by hand, `docker run --gpus all
# IMAGE` runs the default sweep.
CMD ["lr-sweep", "run"]
