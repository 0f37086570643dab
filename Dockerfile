# Sekisho in a slim image, running as a non-root user; state lives in the volume /app/var.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --create-home --home-dir /home/sekisho --uid 10001 sekisho
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
COPY quarantine ./quarantine
RUN pip install '.[fast]'
COPY gateway.toml ./gateway.toml
# Inside a container, listen on all interfaces; publish the ports you want.
RUN sed -i 's/^listen = "127.0.0.1:10025"/listen = "0.0.0.0:10025"/; s/^listen = "127.0.0.1:8025"/listen = "0.0.0.0:8025"/' gateway.toml \
 && mkdir -p /app/var && chown -R sekisho:sekisho /app/var
USER sekisho
VOLUME ["/app/var"]
EXPOSE 10025 8025
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8025/healthz').status != 200)"
STOPSIGNAL SIGTERM
CMD ["sekisho", "serve", "--config", "/app/gateway.toml"]
