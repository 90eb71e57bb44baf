# syntax=docker/dockerfile:1
#
# latentserve images, one multi-stage file (docs/deployment.md):
#
#   docker build --target service    -t latentserve/service:0.1.0 .
#   docker build --target gpu-worker -t latentserve/gpu-worker:0.1.0 .
#   docker build --target export     -t latentserve/export:0.1.0 .
#
#   service     slim Python + onnxruntime (CPU): `latentserve serve`, and the CPU worker
#   gpu-worker  NVIDIA CUDA 13 runtime + cuDNN 9 + onnxruntime-gpu: `latentserve worker`
#   export      slim Python + torch (CPU build): one-shot training and ONNX export
#
# Only `export` carries torch. Base images are pinned by tag, Python packages by version
# (docker/requirements-*.txt); every image runs as the unprivileged user latentserve
# (uid 10001), which owns /models so the export job can write the shared model volume.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UID=10001

# ---- wheel: build the latentserve wheel (generates the gRPC stubs from proto/) --------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY docker/build-constraints.txt docker/
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY latentserve latentserve
COPY worker worker
COPY service service
COPY eval eval
COPY export export
# PIP_CONSTRAINT reaches pip's isolated build environment: the build backend is pinned too.
RUN PIP_CONSTRAINT=/src/docker/build-constraints.txt pip wheel --no-deps --wheel-dir /wheels .

# ---- service: gRPC service (and the CPU worker) --------------------------------------
FROM ${PYTHON_IMAGE} AS service
ARG UID
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    LATENTSERVE_MODELS=/models
RUN groupadd --system --gid ${UID} latentserve \
 && useradd --system --uid ${UID} --gid latentserve --home-dir /app --shell /usr/sbin/nologin latentserve
COPY docker/requirements-service.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels /tmp/requirements.txt
# The shipped zoo: a fresh named volume mounted on /models starts as a copy of it.
COPY --chown=latentserve:latentserve models /models
WORKDIR /app
RUN chown latentserve:latentserve /app
USER latentserve
EXPOSE 50051 9090
CMD ["latentserve", "serve"]

# ---- gpu-worker: Redis job worker on onnxruntime's CUDA provider ---------------------
FROM ${CUDA_IMAGE} AS gpu-worker
ARG UID
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH \
    LATENTSERVE_MODELS=/models LATENTSERVE_PROVIDER=cuda
# Ubuntu 24.04's Python 3.12, the same minor version as the service image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv \
 && groupadd --system --gid ${UID} latentserve \
 && useradd --system --uid ${UID} --gid latentserve --home-dir /app --shell /usr/sbin/nologin latentserve
COPY docker/requirements-service.txt docker/requirements-gpu.txt /tmp/
RUN pip install --requirement /tmp/requirements-gpu.txt
COPY --from=wheel /wheels/ /tmp/wheels/
# No `pip check` here: it would flag the `onnxruntime` requirement, which onnxruntime-gpu
# fulfils under another distribution name. Check what matters instead: the CUDA provider
# is built in, and the worker imports.
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels /tmp/requirements-*.txt \
 && python -c "import onnxruntime as ort, latentserve.worker.jobqueue.consumer; \
assert 'CUDAExecutionProvider' in ort.get_available_providers(), ort.get_available_providers()"
COPY --chown=latentserve:latentserve models /models
WORKDIR /app
RUN chown latentserve:latentserve /app
USER latentserve
CMD ["latentserve", "worker", "--provider", "cuda"]

# ---- export: train and export the zoo into the model volume (one-shot job) -----------
FROM ${PYTHON_IMAGE} AS export
ARG UID
# CPU wheels of torch; plain PyPI's torch for Linux is the multi-GB CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    LATENTSERVE_MODELS=/models DATA=/data/mnist REPO=/models RUNS=/app/runs
RUN groupadd --system --gid ${UID} latentserve \
 && useradd --system --uid ${UID} --gid latentserve --home-dir /app --shell /usr/sbin/nologin latentserve
COPY docker/requirements-service.txt docker/requirements-export.txt /tmp/
RUN pip install --no-deps --index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install --requirement /tmp/requirements-export.txt
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels /tmp/requirements-*.txt
WORKDIR /app
COPY --chown=latentserve:latentserve scripts scripts
COPY --chown=latentserve:latentserve models /models
RUN mkdir -p /app/runs /app/examples && chown -R latentserve:latentserve /app
USER latentserve
CMD ["bash", "-c", "scripts/build_zoo.sh && python scripts/train_classifier.py --data \"$DATA\" --out \"$REPO/classifiers/mnist-classifier/1\""]
