# The reproducible-study image: `docker run IMAGE run /in /out ...` is `dmriflow run ...`.
#
#   make container                      # CPU torch (what the tests build), tag dmriflow:latest
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:<tag>-runtime-ubuntu22.04 ...  # see README
#
# Build arguments:
#   BASE_IMAGE   a Python 3.11 image (python:3.11-slim by default; any image with python3,
#                its venv module and useradd works, e.g. a CUDA runtime image with Python)
#   TORCH_INDEX  an extra wheel index holding another build of the locked torch version (a
#                CUDA index of the PyTorch project): torch then comes from there, unhashed,
#                and the image's environment id says "unlocked" (see README, Container)
# Every dependency comes from requirements.lock, hash-checked (pip --require-hashes), so
# two builds of one commit are the same environment. Wheels in build/wheels/ are used
# first: `make container` puts the locked CPU torch wheel there (hash as in the lock).
# Classic builder compatible (no BuildKit-only syntax). Two stages: the wheels stay in the
# first (the dependencies' venv); the image takes that venv and installs the package on top.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/dmriflow
ENV PATH=/opt/dmriflow/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
COPY requirements.lock build/wheel[s] /src/wheels/
# with TORCH_INDEX: the same torch version (without the +cpu label) and its CUDA libraries
# from that index first, then the rest of the lock, still hash-checked
RUN if [ -n "$TORCH_INDEX" ]; then \
        torch=$(grep -o '^torch==[^ +]*' requirements.lock) && \
        pip install --index-url "$TORCH_INDEX" "$torch" && \
        python3 -c "import re; t = open('requirements.lock').read(); \
open('requirements.lock', 'w').write(re.sub(r'(?ms)^torch==.*?(?=^[a-z])', '', t))"; \
    fi \
    && pip install --require-hashes --no-deps --find-links /src/wheels -r requirements.lock

FROM ${BASE_IMAGE}
# the image's tag, recorded as GeneratedBy.Container.Tag in the derivatives' dataset_description.json
ARG IMAGE_TAG=dmriflow:latest
# MPLCONFIGDIR/XDG_CACHE_HOME: writable for any --user uid, not only the image's user
ENV PATH=/opt/dmriflow/bin:$PATH PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/cache \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DMRIFLOW_CONTAINER_TAG=${IMAGE_TAG}
RUN useradd --create-home --uid 1000 dmriflow
COPY --from=deps /opt/dmriflow /opt/dmriflow
# the package last, so a code change rebuilds only these small layers
COPY setup.cfg pyproject.toml README.md requirements.lock /tmp/dmriflow/
COPY interfaces /tmp/dmriflow/interfaces
COPY pipelines /tmp/dmriflow/pipelines
COPY models /tmp/dmriflow/models
# no build isolation: setuptools comes from the lock, nothing else is downloaded
# (MP-PCA's numba kernels compile at first use into XDG_CACHE_HOME: the package
# folder is not the runtime user's to write)
RUN pip install --no-deps --no-build-isolation /tmp/dmriflow && pip check \
    && rm -rf /tmp/dmriflow
USER dmriflow
WORKDIR /home/dmriflow
ENTRYPOINT ["dmriflow"]
CMD ["--help"]
