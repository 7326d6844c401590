# syntax=docker/dockerfile:1
# RetroInfer serving image: Ray Serve + the engine, torch 2.11 on CUDA 13.0 (what the GPU test
# machines and benchmarks/results ran), Python 3.12.
#   docker build -t <your-registry>/retroinfer:0.1.0 .
# Used by k8s/ (KubeRay RayService and RayJob). KubeRay starts Ray itself: it replaces the command
# with `/bin/bash -lc -- "ulimit ...; ray start ... --block"`, so this image has no CMD or
# ENTRYPOINT of its own. Outside Kubernetes:
#   docker run --gpus all --shm-size 20g -v /models:/models -p 8000:8000 IMAGE \
#     bash -lc "serve run deployments/qwen7b.yaml"
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

# torch from PyTorch's CUDA 13.0 wheel index (TORCH_INDEX), like the base image's nvcc.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
# Parallel compile jobs if flash-attn has no prebuilt wheel for this torch/CUDA/Python.
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:${PATH}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3.12 with venv and headers (Triton compiles its launcher with gcc at run time; the devel
# image brings gcc and nvcc, which flashinfer's JIT needs too), wget (KubeRay's readiness probe of
# RayService workers runs `bash -c "wget ... localhost:8000/-/healthz"`), numactl (checking the
# NUMA binding: k8s/README.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        numactl \
        python3 \
        python3-dev \
        python3-venv \
        wget \
    && rm -rf /var/lib/apt/lists/*

# KubeRay runs Ray in a login shell, and Ubuntu's /etc/profile resets PATH: put the venv and CUDA
# back for login shells too.
RUN echo "export PATH=/opt/venv/bin:/usr/local/cuda/bin:\$PATH" > /etc/profile.d/retroinfer.sh \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir --upgrade pip==26.3 setuptools==84.2.1 wheel==0.48.0 \
        packaging==26.4 ninja==1.13.2 psutil==7.2.2 \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /opt/retroinfer/src
COPY pyproject.toml README.md ./
COPY retroinfer ./retroinfer
COPY kernels ./kernels
COPY cluster ./cluster
COPY deployments ./deployments

# The package with its serve and gpu extras, as the README says: pip install '.[serve,gpu]'.
# --no-build-isolation: flash-attn's build imports the torch installed above; the constraint keeps
# pip from replacing that torch. The source tree is removed afterwards so that nothing imports it
# instead of the installed package (whose retroinfer.kernels / retroinfer.cluster are mapped from
# the top-level folders); the Serve config files stay in /opt/retroinfer/deployments.
RUN echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && MAX_JOBS=${MAX_JOBS} pip install --no-cache-dir --no-build-isolation -c /tmp/constraints.txt '.[serve,gpu]' \
    && mkdir -p /opt/retroinfer/deployments \
    && cp deployments/*.yaml /opt/retroinfer/deployments/ \
    && rm -rf /opt/retroinfer/src /tmp/constraints.txt
WORKDIR /opt/retroinfer

# Non-root user `ray`, uid 1000 as in Ray's own images (the base's `ubuntu` user had that uid).
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --no-log-init --create-home --uid 1000 --shell /bin/bash ray

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 1000
# Ray Serve HTTP (KubeRay also opens 6379 GCS, 8265 dashboard, 10001 client, 8080 metrics on its pods).
EXPOSE 8000
