# model-service: the service and a store of models, as one image.
#   docker build -t model-service:0.1.0 .
#   docker run --rm -p 8080:8080 model-service:0.1.0          # the bundled demo store
#   docker run --rm -p 8080:8080 -p 8081:8081 model-service:0.1.0 --preload --grpc-port 8081   # V2 over gRPC too
#   docker run --rm -p 8080:8080 -v /srv/models:/models:ro -e MODEL_SERVICE_STORE=/models model-service:0.1.0
# BASE_IMAGE: any Debian-like image with python3 (3.11 or newer) and its venv module; the default is the official
# Python image.  tests/test_deploy.py builds on a base it makes locally with mmdebstrap.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

WORKDIR /app
COPY pyproject.toml setup.cfg README.md service.py ./
# A virtual environment: the same on the official image and on a distribution's python3 (which refuses
# system-wide pip installs); its bin/ comes first on PATH, so `python` and `model-service` are its own.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir '.[workers,grpc]' \
    && useradd --system --uid 10001 --home-dir /app service
ENV PATH=/opt/venv/bin:$PATH
COPY model_store ./model_store

USER 10001
EXPOSE 8080 8081
ENV MODEL_SERVICE_STORE=/app/model_store \
    MODEL_SERVICE_HOST=0.0.0.0 \
    MODEL_SERVICE_PORT=8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
# The command is the ENTRYPOINT and the default flags are CMD: Kubernetes' `args:` (and `docker run IMAGE
# --flag ...`) replace only CMD, so a manifest's flags reach model-service.
ENTRYPOINT ["model-service"]
CMD ["--preload", "--shutdown-timeout", "20"]
