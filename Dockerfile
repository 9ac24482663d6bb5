# Reproducible-study image. CPU torch by default (what the tests build);
# TORCH_INDEX may name a wheel index holding the wanted torch build (a CPU-only
# index for small test images, a CUDA one with a CUDA base image for GPUs).
# First version: verified by the scale-out issue's container test.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg

RUN useradd --create-home --uid 1000 dmriflow
WORKDIR /opt/dmriflow
COPY setup.cfg pyproject.toml constraints.txt README.md ./
COPY interfaces ./interfaces
COPY pipelines ./pipelines
COPY models ./models
RUN python3 -m pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
    && python3 -m pip install -c constraints.txt . \
    && rm -rf /root/.cache

USER dmriflow
WORKDIR /home/dmriflow
ENTRYPOINT ["dmriflow"]
CMD ["--help"]
