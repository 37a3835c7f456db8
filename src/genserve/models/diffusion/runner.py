"""``DiffusionRunner``: any diffusers pipeline (``genserve-diffusion``, Stable Diffusion, ...) run on
batches of ``ImageJob`` for text-to-image, image-to-image and inpainting (the pipeline's own
``image``/``mask_image``/``strength`` arguments, or the pipelines diffusers derives from it with
``from_pipe``).

Every job carries its own seed and the pipeline draws its noise from a generator of that seed alone,
and the denoiser's batch-variant layers run row by row (``models.batch_invariance``), so a job gives
the same pixels alone or batched.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from genserve.models.batch_invariance import make_batch_invariant, probe_rows
from genserve.models.params import ImageJob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scheduler:
    """A sampler the API may name: its diffusers class, the config changes that make it what the name
    says, and its name in a pipeline's own ``scheduler_named`` table (``genserve-diffusion``'s)."""

    cls: str
    changes: dict[str, Any] = field(default_factory=dict)
    pipeline_name: str | None = None  # None: the API's name


# The API's scheduler names, the only table of them.
SCHEDULERS: dict[str, Scheduler] = {
    "ddpm": Scheduler("DDPMScheduler"),
    "ddim": Scheduler("DDIMScheduler"),
    "dpm++": Scheduler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "dpmsolver++"),
    "euler": Scheduler("EulerDiscreteScheduler"),
    "euler_a": Scheduler("EulerAncestralDiscreteScheduler"),
}
UPSCALES = (1, 2, 4, 8)  # pixel models serve their native size and these nearest-neighbour enlargements
LATENT_SIZES = (256, 512, 768, 1024)  # latent models: these squares within half to twice their native size


def upscale(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """(B, h, w, C) → (B, height, width, C) by repeating pixels (integer factors only)."""
    fy, fx = height // images.shape[1], width // images.shape[2]
    return images.repeat(fy, axis=1).repeat(fx, axis=2) if (fy, fx) != (1, 1) else images


class DiffusionRunner:
    """A diffusers pipeline as a batch function: ``run(jobs) -> (H, W, 3) uint8 images``."""

    kind = "diffusion"
    class_names: tuple[str, ...] = ()  # text-conditioned: any prompt

    def __init__(self, pipe: Any, max_rows: int) -> None:
        self.pipe = pipe
        self.device = pipe.device
        params = inspect.signature(pipe.__call__).parameters
        self.takes_size = "height" in params and "width" in params
        own = "mask_image" in params and "image" in params  # genserve-diffusion does all three itself
        self.inpaint = pipe if own else _derived_pipeline(pipe, "AutoPipelineForInpainting")
        self.img2img = pipe if own and "strength" in params else _derived_pipeline(pipe, "AutoPipelineForImage2Image")
        self.default_scheduler = next((name for name, s in SCHEDULERS.items()
                                       if s.cls == type(pipe.scheduler).__name__), None)
        self._base_scheduler_config = dict(pipe.scheduler.config)
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        scale = getattr(pipe, "vae_scale_factor", 1) if getattr(pipe, "vae", None) is not None else 1
        native = int(denoiser.config.sample_size) * scale
        self.native = (native, native)
        self.pixel_space = scale == 1
        steps = params.get("num_inference_steps")
        self.default_steps = steps.default if steps is not None and isinstance(steps.default, int) else 50
        self.invariant = self._probe(max_rows)
        # A pipeline that can isolate samples itself (genserve's own) need not, once the probe holds.
        self.extra = {"batch_invariant": not self.invariant} if "batch_invariant" in params else {}

    @property
    def can_edit(self) -> bool:
        return self.inpaint is not None

    @property
    def can_vary(self) -> bool:
        return self.img2img is not None

    @property
    def sizes(self) -> list[tuple[int, int]]:
        w, h = self.native
        if self.pixel_space:
            return [(w * f, h * f) for f in UPSCALES]
        return sorted({(w, h)} | {(s, s) for s in LATENT_SIZES if w // 2 <= s <= 2 * w})

    def _probe(self, max_rows: int) -> bool:
        """Batch invariance of the denoiser at its native size, for up to ``max_rows`` rows (a batch
        of requests doubles with classifier-free guidance). Transformer denoisers (FLUX, SD3) are not
        probed yet: they run one image at a time."""
        unet = getattr(self.pipe, "unet", None)
        if unet is None:
            return False
        g = torch.Generator().manual_seed(0)
        c = unet.config
        size = int(c.sample_size)
        x = torch.randn(max_rows, c.in_channels, size, size, generator=g).to(self.device, unet.dtype)
        ctx_dim = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
        ctx = torch.randn(max_rows, 8, ctx_dim, generator=g).to(self.device, unet.dtype)
        t = torch.full((max_rows,), 500, device=self.device)
        labels = None  # a projected class embedding (genserve-diffusion's pooled text vector)
        if c.get("class_embed_type") == "projection":
            labels = torch.randn(max_rows, c.projection_class_embeddings_input_dim, generator=g).to(self.device,
                                                                                                    unet.dtype)

        def probe(n: int) -> torch.Tensor:
            rows = probe_rows(n)
            extra = {"class_labels": labels[rows]} if labels is not None else {}
            return unet(x[rows], t[rows], encoder_hidden_states=ctx[rows], **extra).sample

        try:
            _, invariant = make_batch_invariant(unet, probe, max_rows)
        except (TypeError, ValueError, RuntimeError) as exc:  # a UNet that needs more inputs than these
            log.warning("could not probe %s for batch invariance (%s): one image at a time", type(unet).__name__, exc)
            return False
        return invariant

    def _scheduler(self, name: str | None) -> Any:
        import diffusers

        if name is None or name == self.default_scheduler:
            return self.pipe.scheduler
        own = getattr(self.pipe, "scheduler_named", None)  # a pipeline's own settings for a sampler win
        if own is not None:
            with contextlib.suppress(ValueError):
                return own(SCHEDULERS[name].pipeline_name or name)
        s = SCHEDULERS[name]
        return getattr(diffusers, s.cls).from_config({**self._base_scheduler_config, **s.changes})

    @torch.inference_mode()
    def run(self, jobs: list[ImageJob], on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        first = jobs[0]
        steps = first.steps or self.default_steps
        kwargs: dict[str, Any] = {
            "prompt": [j.prompt for j in jobs],
            "negative_prompt": [j.negative_prompt or "" for j in jobs],
            "num_inference_steps": steps,
            "generator": [torch.Generator(device=self.device).manual_seed(j.seed) for j in jobs],
            "output_type": "np",
            **self.extra,
        }
        if first.guidance_scale is not None:
            kwargs["guidance_scale"] = first.guidance_scale
        if self.takes_size and not self.pixel_space:
            kwargs["height"], kwargs["width"] = first.height, first.width
        if first.image is not None:  # PIL images: what every diffusers pipeline reads as [0, 255] RGB
            kwargs["image"] = [Image.fromarray(j.image) for j in jobs]
            if first.mask is not None:
                kwargs["mask_image"] = [Image.fromarray((j.mask * 255).round().astype(np.uint8), "L") for j in jobs]
            if first.strength is not None:
                kwargs["strength"] = first.strength
        callbacks = [cb for cb in (on_step, *(j.on_step for j in jobs)) if cb is not None]

        def on_step_end(_pipe: Any, step: int, _t: Any, _kw: dict) -> dict:
            for cb in callbacks:
                cb(step + 1, steps)
            return {}

        kwargs["callback_on_step_end"] = on_step_end
        pipe = self.pipe if first.image is None else self.img2img if first.mask is None else self.inpaint
        pipe.scheduler, default = self._scheduler(first.scheduler), pipe.scheduler
        try:
            images = pipe(**kwargs).images  # (B, H, W, 3) floats in [0, 1]
        finally:
            pipe.scheduler = default
        pixels = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
        if first.mask is not None:  # outside the mask the caller's pixels come back exactly
            keep = np.stack([j.mask for j in jobs])[..., None] < 0.5
            pixels = np.where(keep, np.stack([j.image for j in jobs]), pixels)
        if self.pixel_space:
            pixels = upscale(pixels, first.width, first.height)
        return list(pixels)


def _derived_pipeline(pipe: Any, auto_class: str) -> Any:
    """The inpainting or image-to-image pipeline (``AutoPipelineForInpainting`` or
    ``AutoPipelineForImage2Image``) that shares ``pipe``'s weights, if diffusers has one for its kind."""
    import diffusers

    try:
        derived = getattr(diffusers, auto_class).from_pipe(pipe)
    except (ValueError, KeyError, TypeError):
        return None
    derived.set_progress_bar_config(disable=True)  # from_pipe does not carry it over: no tqdm in the server's log
    return derived
