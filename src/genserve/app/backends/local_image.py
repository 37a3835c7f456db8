"""In-process image models behind one ``DynamicBatcher`` each.

A request becomes one ``ImageJob`` per image; jobs that can share a forward pass (same size, steps,
scheduler, guidance, kind and strength) are batched by the batcher's key. Every job carries its own
seed and the model draws its noise from a generator of that seed alone, and the model's
batch-variant layers run row by row (``models.batch_invariance``), so a job gives the same pixels
alone or batched.

Two runners adapt models to jobs:

- ``DiffusionRunner``: any diffusers pipeline (``genserve-diffusion``, Stable Diffusion, …) for
  text-to-image, image-to-image and inpainting (the pipeline's own ``image``/``mask_image``/
  ``strength`` arguments, or the pipelines diffusers derives from it with ``from_pipe``);
- ``LatentRunner``: genserve's GAN, VAE and flow modules (``models.image``): sampling and
  interpolation between the latents of two seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from genserve.app.backends.batching import BatchedBackend
from genserve.app.errors import InvalidRequestError
from genserve.models.batch_invariance import make_batch_invariant, probe_rows

log = logging.getLogger(__name__)

# Scheduler names of the API → diffusers classes and the config changes that make them what the name says.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}
PIPELINE_SCHEDULER_NAMES = {"dpm++": "dpmsolver++"}  # API name → genserve-diffusion's scheduler_named
UPSCALES = (1, 2, 4, 8)  # pixel models serve their native size and these nearest-neighbour enlargements
LATENT_SIZES = (256, 512, 768, 1024)  # latent models: these squares within half to twice their native size


@dataclass
class ImageJob:
    """One image to make."""

    prompt: str
    seed: int
    width: int
    height: int
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    class_index: int | None = None
    image: np.ndarray | None = None  # edits: (H, W, 3) uint8 at the size the pipeline takes
    mask: np.ndarray | None = None   # inpainting: (H, W) float in [0, 1], 1 = repaint; None: image-to-image
    strength: float | None = None    # edits: how much of the image is redone (default: the pipeline's)
    on_step: Callable[[int, int], None] | None = field(default=None, compare=False)

    def key(self) -> tuple:
        kind = "generate" if self.image is None else "image-to-image" if self.mask is None else "inpaint"
        return (self.width, self.height, self.steps, self.scheduler, self.guidance_scale, kind, self.strength)


def upscale(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """(B, h, w, C) → (B, height, width, C) by repeating pixels (integer factors only)."""
    fy, fx = height // images.shape[1], width // images.shape[2]
    return images.repeat(fy, axis=1).repeat(fx, axis=2) if (fy, fx) != (1, 1) else images


class DiffusionRunner:
    def __init__(self, pipe: Any, max_rows: int) -> None:
        self.pipe = pipe
        self.device = pipe.device
        params = inspect.signature(pipe.__call__).parameters
        self.takes_size = "height" in params and "width" in params
        own = "mask_image" in params and "image" in params  # genserve-diffusion does all three itself
        self.inpaint = pipe if own else _derived_pipeline(pipe, "AutoPipelineForInpainting")
        self.img2img = pipe if own and "strength" in params else _derived_pipeline(pipe, "AutoPipelineForImage2Image")
        self.default_scheduler = next((name for name, (cls, _) in SCHEDULERS.items()
                                       if cls == type(pipe.scheduler).__name__), None)
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
                return own(PIPELINE_SCHEDULER_NAMES.get(name, name))
        cls, changes = SCHEDULERS[name]
        return getattr(diffusers, cls).from_config({**self._base_scheduler_config, **changes})

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
        return getattr(diffusers, auto_class).from_pipe(pipe)
    except (ValueError, KeyError, TypeError):
        return None


class LatentRunner:
    """genserve's GAN, VAE and flow (``models.image``): ``sample``, ``latents`` and ``decode``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        h, w = model.size
        self.native = (w, h)
        self.sizes = [(w * f, h * f) for f in UPSCALES]
        self.class_names: list[str] = list(model.class_names)

    def run(self, jobs: list[ImageJob], on_step: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
        first = jobs[0]  # one network pass: no steps to report
        images = self.model.sample([j.seed for j in jobs], [j.class_index for j in jobs])
        return list(_rgb(upscale(images, first.width, first.height)))

    def interpolate(self, seed_start: int, seed_end: int, frames: int, method: str, class_index: int | None,
                    width: int, height: int) -> np.ndarray:
        ends = self.model.latents([seed_start, seed_end])
        weights = torch.linspace(0, 1, frames, dtype=ends.dtype)
        path = slerp(ends[0], ends[1], weights) if method == "slerp" else torch.lerp(
            ends[0][None], ends[1][None], weights[:, None])
        classes = [class_index] * frames
        return _rgb(upscale(self.model.decode(path, classes), width, height))


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Points on the great circle from ``a`` to ``b`` (norms interpolated linearly), (frames, dim)."""
    na, nb = a.norm(), b.norm()
    cos = torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:
        return torch.lerp(a[None], b[None], weights[:, None])
    w = weights[:, None]
    direction = (torch.sin((1 - w) * omega) * (a / na) + torch.sin(w * omega) * (b / nb)) / torch.sin(omega)
    path = direction * torch.lerp(na, nb, w)
    path[weights == 0], path[weights == 1] = a, b  # the ends exactly: the two seeds' own images
    return path


def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class LocalImageBackend(BatchedBackend):
    runner: DiffusionRunner | LatentRunner | None = None

    def setup(self) -> None:
        e = self.entry
        model = self.load_model()
        if e.attention == "genserve" and hasattr(model, "scheduler"):
            from genserve.models.diffusion.attention import use_genserve_attention

            # Before the runner, whose batch-invariance probe then runs it, and before compile.
            use_genserve_attention(model)
        self.runner = DiffusionRunner(model, 2 * e.max_batch_size) if hasattr(model, "scheduler") else \
            LatentRunner(model)
        if e.compile and isinstance(self.runner, DiffusionRunner):
            from genserve.models.diffusion.loading import compile_denoiser

            compile_denoiser(model)
        self.loaded = True

    async def start(self) -> None:
        runner = self.runner
        assert runner is not None
        # A diffusers model whose rows stayed batch-variant (see the load log) runs one image at a time.
        batch = None if getattr(runner, "invariant", True) else 1
        self.start_batcher(self._timed(runner.run), key=ImageJob.key, max_batch_size=batch)

    def _timed(self, run: Callable[..., list[np.ndarray]]) -> Callable[[list[ImageJob]], list[np.ndarray]]:
        """``run`` reporting each denoising step's latency to the metrics."""
        hist, mid = self.metrics.denoising_step_seconds, self.entry.id

        def timed(jobs: list[ImageJob]) -> list[np.ndarray]:
            last = time.perf_counter()

            def tick(_step: int, _total: int) -> None:
                nonlocal last
                now = time.perf_counter()
                hist.labels(mid).observe(now - last)
                last = now

            return run(jobs, tick)

        return timed

    def describe(self) -> dict:
        r = self.runner
        return {"sizes": [f"{w}x{h}" for w, h in r.sizes]} if r is not None else {}

    def class_index(self, name: str) -> int | None:
        """``name``'s class for a class-conditional module (None for 'random'); 400 otherwise."""
        names = getattr(self.runner, "class_names", [])
        if not names or name.strip().lower() == "random":
            return None
        if name.strip() in names:
            return names.index(name.strip())
        raise InvalidRequestError(f"'{name}' is not a class of this model; use one of {', '.join(names)} or "
                                  "'random'.", param="prompt")

    async def generate(self, jobs: list[ImageJob]) -> list[np.ndarray]:
        assert self.batcher is not None
        return await self.batcher.submit_many(jobs)

    async def interpolate(self, *args: Any) -> np.ndarray:
        runner = self.runner
        if not isinstance(runner, LatentRunner):
            raise InvalidRequestError("Interpolation needs a GAN, VAE or flow model.", param="model")
        return await asyncio.to_thread(runner.interpolate, *args)

