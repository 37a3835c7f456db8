"""``genserve-flow``: a class-conditional RealNVP for 8×8 digits (family ``flow``).

Dinh et al. 2017, "Density estimation using Real NVP": an invertible map f from an image to a
standard Gaussian z of the same dimension (64), built from affine coupling layers. A coupling keeps
the pixels a binary mask selects, x_a, and moves the others, y_b = x_b·exp(s(x_a, c)) + t(x_a, c),
with s, t a small CNN, so its inverse is as cheap and its Jacobian triangular:
log|det ∂y/∂x| = Σ s. Exact log-likelihood by change of variables:
log p(x | c) = log N(f(x); 0, I) + log|det ∂f/∂x|.

Layout, as in the paper at our scale: pixels to logits (x → logit(α + (1−2α)x), α = 0.05), then
``couplings_8x8`` checkerboard couplings of alternating parity on the 1×8×8 image, a squeeze to
4×4×4 (each 2×2 patch becomes 4 channels), then ``couplings_4x4`` couplings cycling through channel
masks (first or last two channels) and checkerboard masks. s = scale·tanh(·) per channel keeps the
scales bounded; the last conv of each s, t network starts at zero, so the flow starts as the identity.
The class enters each coupling as a learned bias of its CNN's hidden layer: p(x | c) per digit.

Data are the 17 grey levels dequantised with uniform noise, x = (g + u) / 17 ∈ [0, 1); bits/dim of
held-out images are then an upper bound on the discrete negative log-likelihood (``digits.dequantize``).
Sampling draws z ~ N(0, T²·I) with temperature ``temperature`` (Kingma & Dhariwal 2018, Glow: a
cooler base distribution trades diversity for cleaner samples), inverts f and maps x back to its
grey level ⌊17·x⌋.

Training keeps a stratified tenth of the train split for validation and ships the checkpoint with
the best validation bits/dim: 1437 images are few, and a flow this size starts to memorise them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genserve.models.common.training import train_loop
from genserve.models.common.weights import load_net, save_net
from genserve.models.image.digits import LEVELS, Split, dequantize, validation_split
from genserve.models.image.generator import ImageGenerator

log = logging.getLogger(__name__)


@dataclass
class FlowConfig:
    latent_dim: int = 64  # = the data dimension, 1×8×8
    hidden: int = 32  # 64 reached 1.96 bits/dim on validation at step 1000, then memorised
    couplings_8x8: int = 4
    couplings_4x4: int = 6
    classes: int = 10
    alpha: float = 0.05
    temperature: float = 0.8  # of the base Gaussian when sampling

    def __post_init__(self) -> None:
        if self.latent_dim != 64:
            raise ValueError(f"a flow's latent is its data: latent_dim must be 64, got {self.latent_dim}")


def checkerboard(h: int, w: int, parity: int) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((ii + jj) % 2 == parity).float()[None, None]  # (1, 1, H, W): 1 = kept, conditions the rest


def channel_mask(c: int, parity: int) -> torch.Tensor:
    keep = torch.arange(c) < c // 2
    return (keep if parity == 0 else ~keep).float()[None, :, None, None]  # (1, C, 1, 1)


class Coupling(nn.Module):
    """Affine coupling: pixels where mask = 1 pass through and set s, t for the others."""

    def __init__(self, channels: int, mask: torch.Tensor, hidden: int, classes: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.class_bias = nn.Embedding(classes, hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        nn.init.zeros_(self.class_bias.weight)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def _s_t(self, x_kept: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv_in(x_kept) + self.class_bias(y)[:, :, None, None])  # (B, hidden, H, W)
        h = F.relu(self.conv_mid(h))
        s, t = self.conv_out(h).chunk(2, dim=1)  # (B, C, H, W) each
        free = 1 - self.mask
        return self.scale * torch.tanh(s) * free, t * free  # zero where the mask keeps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._s_t(x * self.mask, y)
        return x * torch.exp(s) + t, s.sum(dim=(1, 2, 3))  # (B, C, H, W), (B,) log|det|

    def inverse(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s, t = self._s_t(z * self.mask, y)  # the kept pixels are unchanged, so s, t are the forward's
        return (z - t) * torch.exp(-s)


def squeeze(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
    return x.reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    x = x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)  # (B, C/4, H, 2, W, 2)
    return x.reshape(B, C // 4, 2 * H, 2 * W)


class RealNVP(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        h, k = config.hidden, config.classes
        self.fine = nn.ModuleList(Coupling(1, checkerboard(8, 8, i % 2), h, k) for i in range(config.couplings_8x8))
        self.coarse = nn.ModuleList(
            Coupling(4, channel_mask(4, i % 2) if (i // 2) % 2 == 0 else checkerboard(4, 4, i % 2), h, k)
            for i in range(config.couplings_4x4))

    def to_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1) → logit(α + (1−2α)x) and its log|det| (B,)."""
        a = self.config.alpha
        p = a + (1 - 2 * a) * x
        ldj = (math.log(1 - 2 * a) - torch.log(p) - torch.log1p(-p)).sum(dim=(1, 2, 3))
        return torch.log(p) - torch.log1p(-p), ldj

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 8, 8) in [0, 1), (B,) classes → z (B, 64) and log|det ∂z/∂x| (B,)."""
        h, logdet = self.to_logits(x)
        for layer in self.fine:
            h, ld = layer(h, y)
            logdet = logdet + ld
        h = squeeze(h)  # (B, 4, 4, 4)
        for layer in self.coarse:
            h, ld = layer(h, y)
            logdet = logdet + ld
        return unsqueeze(h).flatten(1), logdet  # (B, 64)

    def inverse(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z (B, 64) → x (B, 1, 8, 8), the inverse of ``forward``; x may leave [0, 1) slightly far out in the tails."""
        h = squeeze(z.view(-1, 1, 8, 8))  # (B, 4, 4, 4)
        for layer in reversed(self.coarse):
            h = layer.inverse(h, y)
        h = unsqueeze(h)  # (B, 1, 8, 8)
        for layer in reversed(self.fine):
            h = layer.inverse(h, y)
        a = self.config.alpha
        return (torch.sigmoid(h) - a) / (1 - 2 * a)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(x | c) (B,) in nats, a density on [0, 1)^64."""
        z, logdet = self(x, y)
        return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(1) + logdet

    def images(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.inverse(z, y).float()
        return (x * LEVELS).floor().clamp(0, LEVELS - 1) / (LEVELS - 1)  # back to a grey level


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageGenerator:
    net = load_net(path, FlowConfig, RealNVP, device, dtype)
    return ImageGenerator(net, "flow", latent_scale=net.config.temperature)


def heldout_likelihoods(path: Path, held: Split, seed: int = 0) -> dict:
    """``genserve eval images``: the exact held-out bits/dim of the flow saved in ``path``, given the class
    and marginal over the classes."""
    from genserve.models.image.evaluate import marginal_nll

    net = load_net(path, FlowConfig, RealNVP)
    nll = heldout_nll(net, held, draws=8, seed=seed)
    marginal = marginal_nll(lambda y: heldout_nll(net, Split(held.levels, y), draws=8, seed=seed), held)
    return {"heldout_bits_per_dim": bits_per_dim(nll.mean()), "heldout_bits_per_dim_marginal": bits_per_dim(marginal),
            "dequantisation": "uniform, x = (g + u) / 17, 8 draws per image"}


def bits_per_dim(nll_nats: torch.Tensor | float, dims: int = 64) -> float:
    """Discrete bits/dim from −log p of dequantised data x = (g + u)/17: adds the 17^D volume factor."""
    return (float(nll_nats) + dims * math.log(LEVELS)) / (dims * math.log(2))


@torch.no_grad()
def heldout_nll(net: RealNVP, split: Split, draws: int = 4, seed: int = 0) -> torch.Tensor:
    """−log p(x | c) (N,) in nats on [0, 1)^64, averaged over ``draws`` dequantisation draws per image."""
    g = torch.Generator().manual_seed(seed)
    net.eval()
    return torch.stack([-net.log_prob(dequantize(split.levels, g), split.labels) for _ in range(draws)]).mean(0)


def make_tiny(path: Path) -> None:
    """A tiny seeded flow saved in ``path`` (the family contract test's instance)."""
    torch.manual_seed(0)
    net = RealNVP(FlowConfig(hidden=8, couplings_8x8=2, couplings_4x4=4))
    with torch.no_grad():  # a fresh flow is the identity (zero-initialised outputs): give it something to invert
        for p in net.parameters():
            p.normal_(0, 0.1)
    save_net(net, "flow", path)


# --- training -----------------------------------------------------------------------------------


@dataclass
class FlowTrainConfig:
    minutes: float = 12.0
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 50.0
    seed: int = 0
    eval_every: int = 500


def fit(train: Split, held: Split, cfg: FlowTrainConfig, config: FlowConfig | None = None) -> tuple[RealNVP, dict]:
    """Maximum likelihood on freshly dequantised batches of 90 % of ``train`` for ``cfg.minutes`` (or
    ``max_steps``); returns the checkpoint with the best bits/dim on the other 10 % (the curve also logs
    ``held``, which chooses nothing)."""
    torch.manual_seed(cfg.seed)
    net = RealNVP(config or FlowConfig())
    fit_split, val = validation_split(train)

    def batch_loss(idx: torch.Tensor, g: torch.Generator, _progress: float) -> tuple[torch.Tensor, float]:
        loss = -net.log_prob(dequantize(fit_split.levels[idx], g), fit_split.labels[idx]).mean()
        return loss, loss.item()

    def evaluate(_progress: float, train_nll: float) -> tuple[float, dict]:
        val_bpd, held_bpd = (bits_per_dim(heldout_nll(net, s, seed=cfg.seed).mean()) for s in (val, held))
        return val_bpd, {"train_bits_per_dim": bits_per_dim(train_nll), "val_bits_per_dim": val_bpd,
                         "heldout_bits_per_dim": held_bpd}

    step, best_step, seconds, curve = train_loop(net, len(fit_split), cfg, batch_loss, evaluate, cfg.grad_clip)
    return net.eval(), {"steps": step, "best_step": best_step, "train_seconds": round(seconds, 1),
                        "fit_images": len(fit_split), "validation_images": len(val), "curve": curve}


def train(out: Path, minutes: float, seed: int = 0, threads: int = 1, max_steps: int | None = None,
          evaluate: bool = True) -> dict:
    """``genserve train flow``: trains, saves to ``out``, evaluates into the model card; the report."""
    from genserve.models.image.train import train_generator

    cfg = FlowTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    return train_generator("flow", out, cfg, fit, threads, evaluate)
