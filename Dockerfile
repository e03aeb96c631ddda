# model-service: the service and a store of models, as one image.
#   docker build -t model-service:0.1.0 .
#   docker run --rm -p 8080:8080 model-service:0.1.0          # the bundled demo store
#   docker run --rm -p 8080:8080 -v /srv/models:/models:ro -e MODEL_SERVICE_STORE=/models model-service:0.1.0
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml setup.cfg README.md service.py ./
RUN pip install --no-cache-dir '.[workers]' && useradd --system --uid 10001 --home-dir /app service
COPY model_store ./model_store

USER 10001
EXPOSE 8080
ENV MODEL_SERVICE_STORE=/app/model_store \
    MODEL_SERVICE_HOST=0.0.0.0 \
    MODEL_SERVICE_PORT=8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
CMD ["model-service", "--preload", "--shutdown-timeout", "20"]
