# One image for every pipeline step (KFP components use it as base_image; `docker run IMAGE <stage> …`).
#   docker build -t jointdistill:0.1.0 .                                   # CPU (the default)
#   docker build -t jointdistill:0.1.0-cuda --build-arg VARIANT=cuda .     # + onnxruntime-gpu for CUDA hosts
# The torch wheel in requirements.lock already carries its CUDA libraries, so both variants run on a CPU
# and train on a GPU; the CUDA variant also serves the ONNX student on the GPU. The install is the same
# script `make` runs (scripts/install.sh), so CI exercises these steps without a Docker engine.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG ORT_GPU_VERSION=1.31.1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    JOINTDISTILL_INSTALL=package
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY scripts/ scripts/
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
RUN if [ "$VARIANT" = cuda ]; then export JOINTDISTILL_ORT_GPU="$ORT_GPU_VERSION"; \
    elif [ "$VARIANT" != cpu ]; then echo "VARIANT=$VARIANT: expected cpu or cuda" >&2; exit 2; fi \
    && scripts/install.sh /opt/venv \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet uv

FROM ${PYTHON_IMAGE} AS runtime
ARG SOURCE_COMMIT=""
LABEL org.opencontainers.image.title="jointdistill" \
      org.opencontainers.image.description="JointDistill pipeline steps: prepare, teachers, distill, evaluate, export, predict" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${SOURCE_COMMIT}"
# git: DVC inside the image (dvc repro / push / pull) needs it.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin jointdistill
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    JOINTDISTILL_SOURCE_COMMIT=${SOURCE_COMMIT}
USER 10001
WORKDIR /home/jointdistill
# `jointdistill serve` (KServe model server, Open Inference Protocol v2)
EXPOSE 8080
ENTRYPOINT ["jointdistill"]
CMD ["--help"]
