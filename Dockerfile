# The reproducible-study image: `docker run IMAGE run /in /out ...` is `dmriflow run ...`.
#
#   make container                      # CPU torch (what the tests build), tag dmriflow:latest
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:<tag>-runtime-ubuntu22.04 ...  # see README
#
# Build arguments:
#   BASE_IMAGE   a Python 3.11 image (python:3.11-slim by default; any image with python3,
#                its venv module and useradd works, e.g. a CUDA runtime image with Python)
#   TORCH_INDEX  an extra wheel index holding the wanted torch build (a CPU-only or a CUDA
#                index of the PyTorch project); torch stays pinned by constraints.txt
# Wheels in build/wheels/ are preferred over any index: `make container` puts there the
# torch build this machine's pip resolves for the pin (the CPU build on the project's
# machines), so the image gets the same torch as the tests without a multi-GB CUDA download.
# Classic builder compatible (no BuildKit-only syntax). Two stages: the wheels stay in the
# first (the dependencies' venv); the image takes that venv and installs the package on top.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/dmriflow
ENV PATH=/opt/dmriflow/bin:$PATH
WORKDIR /src
# torch first, from the pin, so no dependency pulls another torch build
COPY constraints.txt ./
COPY constraints.txt build/wheel[s] /src/wheels/
RUN pip install --find-links /src/wheels -c constraints.txt \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch
# then the dependencies named in setup.cfg
COPY setup.cfg ./
RUN python3 -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'])" > requirements.txt \
    && pip install --find-links /src/wheels -c constraints.txt -r requirements.txt

FROM ${BASE_IMAGE}
# MPLCONFIGDIR/XDG_CACHE_HOME: writable for any --user uid, not only the image's user
ENV PATH=/opt/dmriflow/bin:$PATH PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/cache \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 dmriflow
COPY --from=deps /opt/dmriflow /opt/dmriflow
# the package last, so a code change rebuilds only these small layers
COPY setup.cfg pyproject.toml README.md constraints.txt /tmp/dmriflow/
COPY interfaces /tmp/dmriflow/interfaces
COPY pipelines /tmp/dmriflow/pipelines
COPY models /tmp/dmriflow/models
RUN pip install --no-deps /tmp/dmriflow && pip check && rm -rf /tmp/dmriflow
USER dmriflow
WORKDIR /home/dmriflow
ENTRYPOINT ["dmriflow"]
CMD ["--help"]
