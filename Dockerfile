# gguf-serve container. CPU image by default; a CUDA one with
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 --build-arg TORCH=cuda .
# Both stages run scripts/install.sh, the same install the README's commands and CI use.
ARG BASE=python:3.11-slim-bookworm

# ---- build: compilers, the virtualenv, the compiled CPU kernels, the default model ----------
FROM ${BASE} AS build
ARG TORCH=auto
# A C++ compiler for the kernels (and Python itself on CUDA bases, which have none).
# Unpinned: the same lines serve Debian and Ubuntu bases, whose versions differ.
# hadolint ignore=DL3008
RUN apt-get update \
    && if command -v python3 >/dev/null; then apt-get install -y --no-install-recommends g++; \
       else apt-get install -y --no-install-recommends g++ python3 python3-venv python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/gguf-serve
COPY . .
ENV GGUF_SERVE_VENV=/opt/gguf-serve/.venv \
    GGUF_SERVE_CACHE=/opt/gguf-serve/cache \
    GGUF_SERVE_TORCH=${TORCH}
# ensure_env also compiles the quantized kernels into $GGUF_SERVE_CACHE/ops; the default
# model is assembled there too, so a container started without -m serves it at once.
RUN bash -c 'source scripts/install.sh && ensure_env ""' \
    && .venv/bin/python -c "from runtime.default_model import default_model_path; default_model_path()"

# ---- runtime: no compilers, a non-root user -------------------------------------------------
FROM ${BASE} AS runtime
# hadolint ignore=DL3008
RUN (command -v python3 >/dev/null || (apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*)) \
    && useradd --create-home --uid 10001 gguf \
    && mkdir /models && chown gguf /models
COPY --from=build --chown=gguf:gguf /opt/gguf-serve /opt/gguf-serve
ENV GGUF_SERVE_CACHE=/opt/gguf-serve/cache \
    PATH=/opt/gguf-serve/.venv/bin:$PATH
USER 10001
WORKDIR /models
VOLUME ["/models"]
# HTTP (llama.cpp's and OpenAI's routes) and gRPC.
EXPOSE 8080 50051
# 503 while the model loads or the server drains: unhealthy until it answers 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
# Inside a container the loopback default would be unreachable: listen on every interface.
# Arguments after the image name go to gguf-serve, e.g. `-m /models/model.gguf`.
ENTRYPOINT ["gguf-serve", "--host", "0.0.0.0"]
CMD []
