# syntax=docker/dockerfile:1
# Framewise orchestrator (the gRPC service in front of Triton). No torch, no TensorRT: the
# models run in the Triton container (docker-compose.yml); this image talks to it over gRPC.
#   docker build -f docker/orchestrator.Dockerfile -t framewise-orchestrator:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Runtime libraries of the wheels: opencv-python-headless needs libglib2.0-0 (no libGL: headless),
# onnxruntime libgomp1. PyAV's wheels bundle their own ffmpeg, so no system ffmpeg is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/framewise
COPY pyproject.toml README.md ./
COPY framewise ./framewise
COPY server ./server
COPY clients ./clients
COPY engines ./engines
COPY did_emulator ./did_emulator

# The project without its dev extras. PyAV (optional at run time: H.264 overlays, FFV1 mask
# videos, audio probing) is installed unless built with --build-arg WITH_PYAV=0.
ARG WITH_PYAV=1
RUN pip install . \
 && if [ "$WITH_PYAV" = "1" ]; then pip install "av>=14,<19"; fi \
 && useradd --system --uid 10001 --home-dir /var/lib/framewise --create-home framewise \
 && mkdir -p /var/lib/framewise/jobs /var/lib/framewise/storage \
 && chown -R framewise:framewise /var/lib/framewise

# Every flag has a FRAMEWISE_* variable (python -m server --help); these are the image's defaults.
# An external Triton (never the bundled one), durable job store and storage in /var/lib/framewise.
ENV FRAMEWISE_TRITON_URL=triton:8001 \
    FRAMEWISE_LISTEN=0.0.0.0:50051 \
    FRAMEWISE_METRICS_LISTEN=0.0.0.0:9091 \
    FRAMEWISE_JOB_STORE=/var/lib/framewise/jobs/jobs.sqlite3 \
    FRAMEWISE_STORAGE_ROOT=/var/lib/framewise/storage \
    FRAMEWISE_LOG_FORMAT=json \
    OPENBLAS_NUM_THREADS=1

USER framewise
WORKDIR /var/lib/framewise
VOLUME ["/var/lib/framewise/jobs", "/var/lib/framewise/storage"]
EXPOSE 50051 9091

# grpc.health.v1 Check of the whole server: SERVING only while Triton and every model are ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

# SIGTERM drains in-flight calls (--shutdown-grace) before exiting. Settings come from the
# FRAMEWISE_* variables above (FRAMEWISE_TRITON_URL: the Triton service's gRPC port); extra flags
# given to `docker run IMAGE --flag value` are appended and win over them.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
