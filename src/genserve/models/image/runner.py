"""``LatentRunner``: genserve's GAN, VAE and flow modules (``models.image``) run on batches of
``ImageJob``: sampling, and interpolation between the latents of two seeds. ``runner_for`` decides
which runner a loaded image model gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from genserve.models.common.interpolation import lerp, slerp
from genserve.models.diffusion import runner as diffusion
from genserve.models.diffusion.runner import UPSCALES, upscale
from genserve.models.image import ImageGenerator
from genserve.models.params import ImageJob


class LatentRunner:
    """genserve's GAN, VAE and flow (``models.image``): ``sample``, ``latents`` and ``decode``. The
    attributes after ``sizes`` are those ``DiffusionRunner`` has too, so a backend describes either."""

    kind = "latent"
    invariant = True  # the modules make themselves batch-invariant at load
    pixel_space = True
    can_edit = can_vary = False

    def __init__(self, model: ImageGenerator) -> None:
        self.model = model
        h, w = model.size
        self.native = (w, h)
        self.sizes = [(w * f, h * f) for f in UPSCALES]
        self.class_names: list[str] = list(model.class_names)

    def class_index(self, name: str) -> int | None:
        """``name``'s class (None for 'random' or a model without classes); ValueError otherwise."""
        if not self.class_names or name.strip().lower() == "random":
            return None
        if name.strip() in self.class_names:
            return self.class_names.index(name.strip())
        raise ValueError(f"'{name}' is not a class of this model; use one of {', '.join(self.class_names)} or "
                         "'random'.")

    def run(self, jobs: list[ImageJob], on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        first = jobs[0]  # one network pass: no steps to report
        images = self.model.sample([j.seed for j in jobs], [j.class_index for j in jobs])
        return list(_rgb(upscale(images, first.width, first.height)))

    def interpolate(self, seed_start: int, seed_end: int, frames: int, method: str, class_index: int | None,
                    width: int, height: int) -> np.ndarray:
        ends = self.model.latents([seed_start, seed_end])
        weights = torch.linspace(0, 1, frames, dtype=ends.dtype)
        path = (slerp if method == "slerp" else lerp)(ends[0], ends[1], weights)
        classes = [class_index] * frames
        return _rgb(upscale(self.model.decode(path, classes), width, height))


def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def runner_for(model: Any, max_rows: int, attention: str = "sdpa",
               compile: bool = False) -> diffusion.DiffusionRunner | LatentRunner:
    """The runner of a loaded image model: genserve's latent modules get a ``LatentRunner``, diffusers
    pipelines a ``DiffusionRunner`` probed for ``max_rows`` rows. ``attention="genserve"`` swaps in
    genserve's attention before the probe runs the denoiser (and before ``compile`` compiles it)."""
    if isinstance(model, ImageGenerator):
        return LatentRunner(model)
    if attention == "genserve":
        from genserve.models.diffusion.attention import use_genserve_attention

        use_genserve_attention(model)
    runner = diffusion.DiffusionRunner(model, max_rows)
    if compile:
        from genserve.models.diffusion.loading import compile_denoiser

        compile_denoiser(model)
    return runner
