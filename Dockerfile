# syntax=docker/dockerfile:1
# Images of this project, one file, two targets:
#   docker build -t epp .                                   # the endpoint picker (default target)
#   docker build -t epp-model-server --target model-server .  # the CPU model server (sim engine)
#   docker build -t epp-model-server --target model-server --build-arg TORCH_SPEC=torch .  # + torch engine
#
# The build stage installs the project and its dependencies (binary wheels) into a virtualenv; the final
# stages copy only that virtualenv onto a slim Python base, without pip, compilers or the sources, and
# run as an unprivileged user (65532).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY epp ./epp
COPY plugins ./plugins
COPY model-server ./model-server
# A pip requirement for the torch engine, e.g. "torch" (empty: the sim engine only). Pass a CPU wheel
# index with --build-arg PIP_EXTRA_INDEX_URL=... to avoid the CUDA build.
ARG TORCH_SPEC=""
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install . \
 && if [ -n "$TORCH_SPEC" ]; then pip install "$TORCH_SPEC"; fi \
 && pip uninstall -y pip setuptools wheel \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && python -c "import epp.cli, epp_model_server.cli, plugins"

FROM ${PYTHON_IMAGE} AS runtime
# The base image's own pip and setuptools are installers too: the final image has none.
RUN python -m pip uninstall -y pip setuptools wheel \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /
USER 65532:65532

FROM runtime AS model-server
# 8000: OpenAI API, /health, /metrics; 5557/5558: KV events and their replay (ZMQ).
EXPOSE 8000 5557 5558
ENTRYPOINT ["epp-model-server"]

FROM runtime AS epp
# 9002: ext_proc (gRPC); 9003: gRPC health; 9090: Prometheus /metrics.
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
