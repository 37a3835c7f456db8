# genserve: HTTP gateway for generative models (CPU image by default).
#
#   docker build -t genserve:latest .
#   docker run --rm -p 127.0.0.1:8000:8000 -e GENSERVE_API_KEYS=change-me genserve:latest
#
# GPU builds: pass a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t genserve:cuda .
# (see docs/deploy.md; a dedicated GPU image comes later).

# ---------------------------------------------------------------------------
# builder: resolve and install everything into a self-contained venv
# ---------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first, from its own index (CPU wheels by default), so that installing the
# package below finds the requirement already satisfied and never pulls CUDA wheels.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# The build context is an allow-list (see .dockerignore): pyproject, README and the
# src/genserve package (with src/genserve/models/weights/*.safetensors).
COPY . .
# Non-editable install: code and weights land in site-packages, /src is not shipped.
RUN pip install --no-cache-dir . \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__"

# ---------------------------------------------------------------------------
# runtime: slim base + the venv, unprivileged user, offline model hubs
# ---------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="genserve" \
      org.opencontainers.image.description="One HTTP API for generative models: text, images, audio and molecules." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/home/genserve/.cache/huggingface \
    GENSERVE_STATE_DIR=/var/lib/genserve

# RDKit's wheel (molecule endpoints) links libXrender and libXext, which the slim image lacks;
# espeak-ng is genserve-speech's synthesiser; the en_US.UTF-8 locale is what hatesonar's ONNX text
# normaliser (moderation) constructs. Unpinned: the versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libxrender1 libxext6 espeak-ng locales \
    && sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' /etc/locale.gen \
    && locale-gen \
    && rm -rf /var/lib/apt/lists/*

# /var/lib/genserve: what the server makes for itself and must keep across restarts (the watermark key
# and the C2PA private CA when none are given; docs/provenance.md): mount a volume there.
RUN groupadd --system --gid 10001 genserve \
    && useradd --system --uid 10001 --gid genserve --create-home --home-dir /home/genserve \
       --shell /usr/sbin/nologin genserve \
    && install -d -o genserve -g genserve -m 0700 /var/lib/genserve

COPY --from=builder /opt/venv /opt/venv
# Fail the build, not the first request, if a native library is missing.
RUN python -c "import rdkit.Chem.Draw.rdMolDraw2D, torch, av, c2pa, hatesonar; hatesonar.Sonar()" \
    && espeak-ng --version

USER 10001:10001
WORKDIR /home/genserve

EXPOSE 8000

# No curl in the slim image: probe liveness with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4).status == 200 else 1)"]

# Binding 0.0.0.0 requires GENSERVE_API_KEYS or GENSERVE_API_KEYS_FILE at run time.
ENTRYPOINT ["genserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
