"""``diffusers``: any diffusers pipeline directory (or hub id) as a model family.

``genserve-diffusion``'s own directory names :class:`GenserveEmojiPipeline` in ``model_index.json``
and loads through it; every other directory (Stable Diffusion, SDXL, FLUX, …) loads through
``DiffusionPipeline.from_pretrained``, which picks the pipeline class the directory names. Weights
must be safetensors (``use_safetensors=True``: nothing is unpickled). On CUDA the default dtype is
float16 for fp16 checkpoints and bfloat16 otherwise (``dtype`` in the registry).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def load(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    index = json.loads((path / "model_index.json").read_text())
    if index.get("_class_name") == "GenserveEmojiPipeline":
        from genserve.models.diffusion import load as load_emoji

        return load_emoji(path, device, dtype)
    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def compile_denoiser(pipe: Any) -> None:
    """``torch.compile`` the UNet or transformer in place (``compile: true`` in the registry)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            setattr(pipe, name, torch.compile(module))
            log.info("compiled %s", name)
