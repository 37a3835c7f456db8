"""The model families genserve can load in process, by the ``family`` name a registry entry uses.

Adding a family: write ``models/<family>`` with a ``load(path, device, dtype)`` that returns the
modality's model object (text families also a ``load_info(path, device)``: the tokenizer and
limits without weights), add it here, and a registry entry can serve it. ``path`` is always a
local directory: hub ids are resolved to the Hugging Face cache first.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, tuple[str, str]] = {
    # family name: (modality, module with load())
    "llama": ("text", "genserve.models.llama"),
    "sentence-transformers": ("embedding", "genserve.models.embedding"),
    "selfies-llama": ("molecule", "genserve.models.molecule.generator"),
    "mol-vae": ("molecule", "genserve.models.molecule.vae"),
    "diffusers": ("image", "genserve.models.diffusion.loading"),
    "gan": ("image", "genserve.models.image.gan"),
    "image-vae": ("image", "genserve.models.image.vae"),
    "flow": ("image", "genserve.models.image.flow"),
    "espeak-ng": ("audio", "genserve.models.audio.espeak"),
    "transformers-tts": ("audio", "genserve.models.audio.transformers_tts"),
    "chorale": ("audio", "genserve.models.music"),
}


def weights_dir() -> Path:
    return Path(__file__).parent / "weights"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, path: Path | None = None) -> torch.dtype:
    """``auto``: bfloat16 on CUDA; on a CPU, bfloat16 when the checkpoint is stored in it and the CPU
    computes it natively (AVX512-BF16 or AMX: about 1.4x the decode throughput of float32 there),
    else float32 (emulated bfloat16 is slower than float32)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16
    stored = None
    if path is not None and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        stored = config.get("dtype") or config.get("torch_dtype")
    return torch.bfloat16 if stored == "bfloat16" and cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, hence the guard
    return bool(check and check()) or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# What a hub snapshot needs for our families: configs, tokenizers, safetensors. Never pickles.
HUB_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.safetensors", "*/*.json"]


def local_dir(source: Path | str) -> Path:
    """``source`` as a local directory: itself, or a hub id's snapshot from the Hugging Face cache
    (downloaded first only where the network is allowed; with ``HF_HUB_OFFLINE=1`` the cache only)."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(source), allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(f"{source!r} is neither a directory nor a hub id in the local Hugging Face "
                                "cache, and downloading is off (HF_HUB_OFFLINE)") from exc


# Families whose load() takes ``quantization`` (weight-only int8 or int4 of the linear layers).
QUANTIZABLE = {"llama", "selfies-llama"}


def load_family_info(family: str, source: Path | str, device: str = "auto") -> Any:
    """A text family's tokenizer and limits without its weights (the module's ``load_info``)."""
    if family not in FAMILIES or not hasattr(module := importlib.import_module(FAMILIES[family][1]), "load_info"):
        raise ValueError(f"family {family!r} has no load_info; text families need one")
    return module.load_info(local_dir(source), resolve_device(device))


def load_family(family: str, source: Path | str, device: str = "auto", dtype: str = "auto",
                quantization: str = "none") -> Any:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    dev = resolve_device(device)
    module = importlib.import_module(FAMILIES[family][1])
    if quantization == "none":
        return module.load(path := local_dir(source), dev, resolve_dtype(dtype, dev, path))
    if family not in QUANTIZABLE:
        raise ValueError(f"family {family!r} does not support quantization={quantization!r}; "
                         f"families that do: {', '.join(sorted(QUANTIZABLE))}")
    return module.load(path := local_dir(source), dev, resolve_dtype(dtype, dev, path), quantization=quantization)
