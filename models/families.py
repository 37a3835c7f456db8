"""The model families genserve can load in process, by the ``family`` name a registry entry uses.

Adding a family: write ``models/<family>`` with a ``load(source, device, dtype)`` that returns the
modality's model object, add it here, and a registry entry can serve it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, tuple[str, str]] = {
    # family name: (modality, module with load())
    "llama": ("text", "models.llama"),
    "sentence-transformers": ("embedding", "models.embedding"),
}


def weights_dir() -> Path:
    return Path(__file__).parent / "weights"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_family(family: str, source: Path | str, device: str = "auto", dtype: str = "auto") -> Any:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    dev = resolve_device(device)
    module = importlib.import_module(FAMILIES[family][1])
    return module.load(source, dev, resolve_dtype(dtype, dev))
