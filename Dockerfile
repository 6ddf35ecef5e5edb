# syntax=docker/dockerfile:1
#
# The image every coreg KFP component (and the MLflow tracking server of k8s/) runs in:
# Python 3.11, the coreg package with its pinned dependencies (torch, kfp, mlflow, ...).
#
#   docker build -t registry.example.com/coreg:0.1.0 .                              # GPU nodes (default)
#   docker build --build-arg VARIANT=cpu -t registry.example.com/coreg:0.1.0-cpu .  # CPU-only nodes
#
# Needs BuildKit (the default builder since Docker 23): it builds only the torch stage that
# VARIANT selects; the legacy builder would download both.
#
# Why a python:3.11 base for GPU nodes too, and not nvidia/cuda or pytorch/pytorch: the
# torch 2.14.1 wheels on PyPI are CUDA builds that bring the CUDA runtime, cuDNN and NCCL
# as nvidia-* wheels; only the driver comes from the node (the NVIDIA container toolkit
# mounts it). An nvidia/cuda base would add a second, unused copy of CUDA, and its Ubuntu
# 24.04 Python is 3.12, which the package does not support (requires-python <3.12);
# pytorch/pytorch ships its own conda Python and torch that pip would replace anyway.
# Pin BASE_IMAGE by digest in CI (python:3.11-slim-bookworm@sha256:...) for reproducible rebuilds.
ARG BASE_IMAGE=python:3.11-slim-bookworm
# cuda: PyPI's CUDA wheels (GPU and CPU nodes, ~6 GB); cpu: the CPU wheels (~2 GB, no GPU).
ARG VARIANT=cuda

# --- a virtual environment with a pinned pip --------------------------------------------
FROM ${BASE_IMAGE} AS venv
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# The venv must sit at the same path in the runtime stage: its scripts' shebangs point here.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir pip==26.3

# --- torch, one stage per variant -------------------------------------------------------
# A layer of its own so that a code change does not download torch again. The pins MUST
# equal pyproject.toml's (tests/test_deploy.py checks it): `pip install .` below then finds
# them satisfied (2.14.1+cpu matches ==2.14.1) and installs nothing else for torch.
FROM venv AS torch-cuda
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

FROM venv AS torch-cpu
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1+cpu torchvision==0.29.1+cpu

# --- the package: the same pip steps as the Makefile's install, without the dev extras --
# DL3006 (untagged image) misreads the stage alias torch-${VARIANT} as an image name.
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS builder
WORKDIR /src
# Only what the wheel needs (.dockerignore allows nothing else): README.md is the
# project's readme in pyproject.toml.
COPY pyproject.toml README.md ./
COPY coreg ./coreg
COPY components ./components
COPY pipelines ./pipelines
# Non-editable: the runtime stage gets the venv, not /src. Every dependency is a wheel
# except kfp-server-api, a pure-Python sdist, so no compiler is needed.
# animal-mnist's metadata asks for tensorflow, which it does not use: --no-deps, as in the Makefile.
# psycopg2-binary is for the MLflow server only (k8s/: --backend-store-uri postgresql://...);
# it is not a dependency of the package.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps animal-mnist==0.4 \
    && pip install --no-cache-dir psycopg2-binary==2.9.13

# --- runtime: the venv on a clean base, no build inputs, no pip cache, non-root ---------
FROM ${BASE_IMAGE} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="coreg" \
      org.opencontainers.image.description="coreg: VLM annotators, noisy partial labels, Co-Reg distillation; KFP components and MLflow server" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.coreg.variant="${VARIANT}"
# Caches (open_clip/HF weights, torch hub, matplotlib) go to /cache, a volume on Kubernetes
# where the root filesystem is read-only (k8s/ mounts an emptyDir or a PVC there).
# NVIDIA_DRIVER_CAPABILITIES asks the container toolkit for the CUDA driver libraries.
# NVIDIA_VISIBLE_DEVICES is deliberately NOT set: "all" in an image would expose every GPU
# of the node to pods that requested none; the device plugin sets it per container.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/coreg \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    MPLCONFIGDIR=/cache/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# A fixed UID/GID so that Kubernetes securityContext (runAsUser: 10001, fsGroup: 10001)
# and volume ownership match the image.
RUN groupadd --gid 10001 coreg \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/coreg --shell /usr/sbin/nologin coreg \
    && mkdir -p /cache \
    && chown 10001:10001 /cache
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/coreg
# Fail the build, not the first pipeline run, when the install is broken.
RUN python -c "import coreg, components, pipelines, kfp, kfp.kubernetes, torch, torchvision, open_clip, mlflow, boto3, psycopg2" \
    && coreg --version
# Batch image: KFP tasks and TrainJob pods run to completion, so there is no service for a
# Docker HEALTHCHECK to probe (Kubernetes ignores HEALTHCHECK anyway). The one long-running
# use, the MLflow server, has liveness/readiness probes on /health in k8s/.
HEALTHCHECK NONE
# KFP, the TrainJob and the MLflow Deployment all set their own command.
CMD ["coreg", "--help"]
