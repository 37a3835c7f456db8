"""``genserve train diffusion``: trains ``genserve-diffusion`` on the emoji of the Noto Color Emoji font.

DDPM training (Ho et al. 2020): a UNet sees a 32×32 image noised to a random one of 1000 timesteps
(linear betas), given the MiniLM encoding of the image's Unicode name, and predicts the velocity
v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022; ``prediction_type="epsilon"`` predicts the noise, as the
first two stages of the shipped run did). Measured on the image, the loss weight of a timestep is
min(SNR, 5) (Min-SNR, Hang et al. 2023): little of a small budget goes to the nearly clean
timesteps, and the noisy ones, where an emoji's colours and layout are decided, keep a weight near
SNR + 1 under v but only SNR under ε. With ε-prediction the image error at t = 900 was 3,700 times
the loss that the network saw, and samples came out with the right textures in the wrong shapes.
10% of captions are replaced by the empty prompt, whose encoding is the unconditional input of
classifier-free guidance. The text encodings of all names
are computed once and cached, so training runs only the UNet. No augmentation: an emoji has one
canonical picture. The saved UNet is the exponential moving average of the trained weights.

Every ``sample_every_s`` seconds a grid of samples for :data:`SHOWCASE` prompts and a few held-out
names is written as a PNG under ``samples_dir``, with the held-out denoising loss in the log.
Previews and the saved pipeline's default sampler are DPM-Solver++ with dynamic thresholding
(:data:`SAMPLER`): DDIM with guidance 4 drew the same framed tiles for every prompt from weights
that DPM-Solver++ and DDPM turn into the right emoji, because DDIM clips its estimate of the image
but steps with the unclipped guided noise. How recognisable the samples are is measured by
``genserve eval images --model genserve-diffusion`` (``evaluate.py``), not here.

A run that continues another (``init_from``) records that run's report under ``history`` in its
own, so the shipped ``training_report.json`` lists every stage that made the weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from genserve.models.common.reports import machine
from genserve.models.common.training import adamw, lr_at, set_lr
from genserve.models.diffusion.data import CACHE_DIR, EmojiSet, load_emoji
from genserve.models.diffusion.evaluate import write_card
from genserve.models.diffusion.pipeline import MINILM, GenserveEmojiPipeline, load_text_encoder

log = logging.getLogger(__name__)

SHOWCASE = ("red apple", "rocket", "cat face")
SAMPLER = "dpmsolver++"  # a name of pipeline.SCHEDULERS: previews and the saved default


@dataclass
class DiffusionTrainConfig:
    minutes: float = 55.0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_heads: int = 4
    max_text_tokens: int = 24
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    min_snr_gamma: float = 5.0
    prediction_type: str = "v_prediction"  # or "epsilon"
    sample_every_s: float = 300.0
    sample_steps: int = 25
    guidance_scale: float = 4.0
    samples_dir: Path = field(default_factory=lambda: CACHE_DIR / "samples")
    max_steps: int | None = None  # stop early (tests); None: the wall-clock budget only
    seed: int = 0
    threads: int = 1
    init_from: Path | None = None  # a saved pipeline directory whose UNet (same shape) training continues from


def build_unet(cfg: DiffusionTrainConfig) -> UNet2DConditionModel:
    """Convolutions only at 32×32 and 16×16, cross-attention at 8×8 (and in the middle block): on a
    CPU, self-attention over 256 or 1024 positions would cost more than the rest of the network."""
    depth = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=("DownBlock2D",) * (depth - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1),
        cross_attention_dim=384, attention_head_dim=cfg.attention_heads, norm_num_groups=32,
        class_embed_type="projection", projection_class_embeddings_input_dim=384)


def build_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    """Linear betas as in DDPM; "trailing" timesteps so that few-step samplers start from pure noise
    (Lin et al. 2024). DDIM, DPM-Solver++ and Euler load from this config."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                         timestep_spacing="trailing", clip_sample=True)


def text_states(names: list[str], cfg: DiffusionTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM token states (N, T, 384) and pooled vectors (N, 384) of ``names``, cached on disk."""
    key = hashlib.sha256(json.dumps([MINILM, cfg.max_text_tokens, names]).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"text-{key}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return t["hidden"], t["pooled"]
    encoder, tokenizer = load_text_encoder(MINILM)
    pipe = GenserveEmojiPipeline(build_unet(cfg), build_scheduler(), encoder, tokenizer,
                                 max_text_tokens=cfg.max_text_tokens)
    parts = [pipe.encode_prompt(names[i:i + 256], torch.device("cpu"), torch.float32)
             for i in range(0, len(names), 256)]
    hidden, pooled = torch.cat([h for h, _ in parts]), torch.cat([p for _, p in parts])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"hidden": hidden.contiguous(), "pooled": pooled.contiguous()}, str(path))
    return hidden, pooled


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 → [-1, 1]


def diffusion_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, x0: torch.Tensor, hidden: torch.Tensor,
                   pooled: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The MSE of the scheduler's prediction type (noise or velocity) at uniformly drawn timesteps,
    weighted so that the implied error on the image is weighted by min(SNR, ``gamma``)."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=hidden, class_labels=pooled).sample
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    if scheduler.config.prediction_type == "v_prediction":  # |v error|² = (SNR + 1) |x₀ error|²
        target, weight = scheduler.get_velocity(x0, noise, t), snr.clamp(max=gamma) / (snr + 1)
    else:  # |ε error|² = SNR |x₀ error|²
        target, weight = noise, snr.clamp(max=gamma) / snr
    return (weight * F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))).mean()


@torch.no_grad()
def heldout_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: EmojiSet, hidden: torch.Tensor,
                 pooled: torch.Tensor, gamma: float) -> float:
    """The training loss on the held-out emoji, with fixed noise and timesteps (comparable over time)."""
    g = torch.Generator().manual_seed(1234)
    losses = [diffusion_loss(unet, scheduler, to_model_space(data.images), hidden, pooled, gamma, g).item()
              for _ in range(4)]
    return float(np.mean(losses))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def sample(pipe: GenserveEmojiPipeline, prompts: list[str], cfg: DiffusionTrainConfig, seed: int = 0) -> np.ndarray:
    """(N, 32, 32, 3) uint8 samples with ``pipe``'s sampler, ``cfg.sample_steps`` steps, seed ``seed + i``
    for prompt i."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                  generator=gens, output_type="np", batch_invariant=False).images
    return (images * 255).round().astype(np.uint8)


def save_grid(rows: list[np.ndarray], path: Path, scale: int = 3) -> None:
    """Rows of (N, 32, 32, 3) uint8 images as one PNG, each image ``scale`` times enlarged."""
    from PIL import Image

    width = max(len(r) for r in rows)
    grid = np.full((len(rows) * 34, width * 34, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * 34 + 1:i * 34 + 33, j * 34 + 1:j * 34 + 33] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def train_diffusion(out: Path, cfg: DiffusionTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    data = load_emoji()
    train, heldout = data.split(heldout=False), data.split(heldout=True)
    hidden, pooled = text_states([*train.names, *heldout.names, ""], cfg)
    n = len(train.names)
    train_hidden, train_pooled = hidden[:n], pooled[:n]
    held_hidden, held_pooled = hidden[n:-1], pooled[n:-1]
    null_hidden, null_pooled = hidden[-1], pooled[-1]
    x_train = to_model_space(train.images)
    log.info("data: %d training and %d held-out emoji, text encoded in %.0fs", n, len(heldout.names), time.time() - t0)

    unet, scheduler = build_unet(cfg), build_scheduler(cfg.prediction_type)
    if cfg.init_from is not None:  # continue a run: its (EMA) weights start both the model and the average
        unet.load_state_dict(load_file(str(Path(cfg.init_from) / "unet" / "diffusion_pytorch_model.safetensors")))
        log.info("continuing from %s", cfg.init_from)
    ema = copy.deepcopy(unet).requires_grad_(False)
    encoder, tokenizer = load_text_encoder(MINILM)
    preview = GenserveEmojiPipeline(ema, scheduler, encoder, tokenizer, max_text_tokens=cfg.max_text_tokens)
    preview.scheduler = preview.scheduler_named(SAMPLER)
    preview.set_progress_bar_config(disable=True)
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("UNet: %.2fM parameters", n_params / 1e6)
    opt = adamw(unet, cfg.lr, cfg.weight_decay)
    prompts = [*SHOWCASE, *heldout.names[:5]]
    g = torch.Generator().manual_seed(cfg.seed)
    step, last_sample, start, budget, smooth = 0, time.time(), time.time(), cfg.minutes * 60, None
    while (elapsed := time.time() - start) < budget and (cfg.max_steps is None or step < cfg.max_steps):
        set_lr(opt, lr_at(cfg, step, elapsed / budget))
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        drop = (torch.rand(cfg.batch_size, generator=g) < cfg.cond_drop)  # classifier-free guidance
        h = torch.where(drop[:, None, None], null_hidden, train_hidden[idx])
        p = torch.where(drop[:, None], null_pooled, train_pooled[idx])
        loss = diffusion_loss(unet, scheduler, x_train[idx], h, p, cfg.min_snr_gamma, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 100 == 0:
            log.info("step %d  %.0fs  %.1f epochs  loss %.4f  lr %.2e", step, elapsed,
                     step * cfg.batch_size / n, smooth, opt.param_groups[0]["lr"])
        if time.time() - last_sample > cfg.sample_every_s:
            last_sample = time.time()
            held = heldout_loss(ema, scheduler, heldout, held_hidden, held_pooled, cfg.min_snr_gamma)
            save_grid([sample(preview, prompts, cfg, seed=s) for s in range(4)],
                      path := cfg.samples_dir / f"step{step:06d}.png")
            log.info("step %d  held-out loss (EMA) %.4f  samples: %s", step, held, path)

    preview.save_pretrained(out)  # the EMA weights, with the preview's sampler as the default
    return report(out, cfg, train, heldout, step, smooth, n_params, time.time() - t0)


def report(out: Path, cfg: DiffusionTrainConfig, train: EmojiSet, heldout: EmojiSet, steps: int,
           train_loss: float | None, n_params: int, seconds: float) -> dict:
    """Write ``training_report.json`` (with the reports of the runs this one continued, under
    ``history``), ``samples.png`` from the saved directory as it ships, and the model card."""
    from genserve.models.diffusion import load

    pipe = load(out, torch.device("cpu"), torch.float32)
    texts = pipe.encode_prompt(heldout.names, torch.device("cpu"), torch.float32)
    held = heldout_loss(pipe.unet, build_scheduler(cfg.prediction_type), heldout, *texts, cfg.min_snr_gamma)
    save_grid([sample(pipe, [*SHOWCASE, *heldout.names[:5]], cfg, seed=s) for s in range(4)], out / "samples.png")
    history = []
    if cfg.init_from is not None and (Path(cfg.init_from) / "training_report.json").is_file():
        before = json.loads((Path(cfg.init_from) / "training_report.json").read_text())
        history = [*before.pop("history", []), before]
    result = {"steps": steps, "minutes": seconds / 60, "parameters": n_params,
              "train_emoji": len(train.names), "heldout_emoji": len(heldout.names),
              "epochs": steps * cfg.batch_size / len(train.names),
              "final_train_loss": train_loss, "heldout_loss": held, "prediction_type": cfg.prediction_type,
              "sampler": f"{SAMPLER}, {cfg.sample_steps} steps, guidance {cfg.guidance_scale}",
              "machine": machine(cfg.threads),
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "history": history}
    (out / "training_report.json").write_text(json.dumps(result, indent=2) + "\n")
    write_card(out)  # with the quality table once `genserve eval images` has measured these weights
    log.info("saved %s: %s", out, {k: v for k, v in result.items() if k not in ("config", "history")})
    return result


def train(out: Path, minutes: float, seed: int = 0, threads: int = 2, init_from: str | None = None,
          prediction_type: str = "v_prediction", lr: float | None = None) -> dict:
    """``genserve train diffusion``: ``init_from`` continues from a saved pipeline directory's UNet."""
    cfg = DiffusionTrainConfig(minutes=minutes, seed=seed, threads=threads, prediction_type=prediction_type,
                               init_from=Path(init_from) if init_from else None, lr=lr or DiffusionTrainConfig.lr)
    return train_diffusion(out, cfg)
