# genserve: HTTP gateway for generative models. One Dockerfile, two images (docs/deploy.md):
#
#   CPU (the default):
#     docker build -t genserve:latest .
#     docker run --rm -p 127.0.0.1:8000:8000 -e GENSERVE_API_KEYS=change-me genserve:latest
#
#   NVIDIA GPU (CUDA torch wheels; the host needs the NVIDIA driver and the NVIDIA container toolkit):
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                  --build-arg NVIDIA_VISIBLE_DEVICES=all -t genserve:cuda .
#     docker run --rm --gpus all -p 127.0.0.1:8000:8000 -e GENSERVE_API_KEYS=change-me genserve:cuda
#
# Both build on python:3.11-slim, on purpose, rather than on an nvidia/cuda base: torch's CUDA wheels
# bundle the CUDA user-space libraries they need (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels in the
# venv), so all the GPU image takes from the host is the driver (libcuda, mounted by the container
# toolkit). A CUDA base would add a second copy of those libraries and has no Python 3.11 (the venv
# below links to the base image's interpreter, so builder and runtime must share it).

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

# torch first, from its own index (CPU wheels by default; a cuXXX index for the GPU image), so that
# installing the package below finds the requirement already satisfied and never pulls other wheels.
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

# The GPU switch of the runtime stage, and what the NVIDIA container runtime reads from an image (as
# nvidia/cuda images set them): which GPUs a container started with `--runtime nvidia` alone gets
# (`--gpus` and Compose's device reservations set their own), and which driver libraries to mount
# (compute: libcuda for torch and Triton; utility: nvidia-smi and NVML). Empty, the CPU image's
# value, makes the runtime leave the container alone, as runc would; the capabilities only matter
# once GPUs are exposed.
ARG NVIDIA_VISIBLE_DEVICES=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/home/genserve/.cache/huggingface \
    GENSERVE_STATE_DIR=/var/lib/genserve \
    NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES} \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# RDKit's wheel (molecule endpoints) links libXrender and libXext, which the slim image lacks;
# espeak-ng is genserve-speech's synthesiser; the en_US.UTF-8 locale is what hatesonar's ONNX text
# normaliser (moderation) constructs. The GPU image also gets a C compiler and libc headers: Triton
# (genserve's attention and int8/int4 kernels on CUDA tensors) compiles its CUDA launcher with one on
# first use. Unpinned: the versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libxrender1 libxext6 espeak-ng locales \
       ${NVIDIA_VISIBLE_DEVICES:+gcc libc6-dev} \
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
# Fail the build, not the first request, if a native library is missing, if the two GPU build args
# disagree (CUDA torch without the NVIDIA env and Triton's compiler, or that env on CPU torch), or if
# what Triton compiles its launcher with is missing (gcc, and the base image's Python headers).
RUN python -c "import rdkit.Chem.Draw.rdMolDraw2D, torch, av, c2pa, hatesonar; hatesonar.Sonar()" \
    && espeak-ng --version \
    && python -c "import os, sys, torch; sys.exit(None if bool(torch.version.cuda) == bool(os.environ['NVIDIA_VISIBLE_DEVICES']) else 'give both GPU build args (TORCH_INDEX_URL=.../cuXXX, NVIDIA_VISIBLE_DEVICES=all) or neither')" \
    && if [ -n "${NVIDIA_VISIBLE_DEVICES}" ]; then gcc --version && python -c "import pathlib, sysconfig, triton; \
       assert (pathlib.Path(sysconfig.get_paths()['include']) / 'Python.h').is_file(), 'no Python.h for Triton'"; fi

USER 10001:10001
WORKDIR /home/genserve

EXPOSE 8000

# No curl in the slim image: probe liveness with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4).status == 200 else 1)"]

# Binding 0.0.0.0 requires GENSERVE_API_KEYS or GENSERVE_API_KEYS_FILE at run time.
ENTRYPOINT ["genserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
