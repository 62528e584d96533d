# gguf-serve container: CPU build by default.
# The same install script as scripts/serve, so CI exercises the same steps.
FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 app
WORKDIR /opt/gguf-serve
COPY --chown=app:app . .
USER app
ENV GGUF_SERVE_VENV=/opt/gguf-serve/.venv
RUN bash -c "source scripts/install.sh && ensure_env ''"
VOLUME ["/models"]
EXPOSE 8080 50051
# Inside a container the loopback default would be unreachable: listen on every interface.
ENTRYPOINT ["/opt/gguf-serve/.venv/bin/gguf-serve", "--host", "0.0.0.0"]
