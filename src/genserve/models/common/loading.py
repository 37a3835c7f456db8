"""Loading a family's model by the ``family`` name a registry entry uses (``models.registry``):
where the weights are (a directory, a hub id in the Hugging Face cache, the shipped ones), which
device and dtype, then the family module's ``load``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from genserve.models import registry


def weights_dir() -> Path:
    """Where the embedded models ship: ``genserve/models/weights``."""
    return Path(__file__).parent.parent / "weights"


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


def load_family_info(family: str, source: Path | str, device: str = "auto") -> Any:
    """A text family's tokenizer and limits without its weights (the module's ``load_info``)."""
    module = importlib.import_module(registry.family(family).module)
    if not hasattr(module, "load_info"):
        raise ValueError(f"family {family!r} has no load_info; text families need one")
    return module.load_info(local_dir(source), resolve_device(device))


def load_family(family: str, source: Path | str, device: str = "auto", dtype: str = "auto",
                quantization: str = "none") -> Any:
    row = registry.family(family)
    if quantization != "none" and not row.quantizable:
        quantizable = sorted(f.name for f in registry.FAMILIES.values() if f.quantizable)
        raise ValueError(f"family {family!r} does not support quantization={quantization!r}; "
                         f"families that do: {', '.join(quantizable)}")
    dev = resolve_device(device)
    module = importlib.import_module(row.module)
    path = local_dir(source)
    extra = {"quantization": quantization} if quantization != "none" else {}
    return module.load(path, dev, resolve_dtype(dtype, dev, path), **extra)
