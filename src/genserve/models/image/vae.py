"""``genserve-vae``: a convolutional class-conditional VAE for 8×8 digits (family ``image-vae``).

Kingma & Welling 2014, "Auto-encoding variational Bayes", conditioned on the class as in Sohn et al.
2015 ("Learning structured output representation using deep conditional generative models"): an
encoder q(z | x, c) = N(mu, diag(exp(logvar))) sees the image and its class, the decoder p(x | z, c)
sees a latent and the class, the prior is p(z) = N(0, I), and training maximises the evidence lower
bound ELBO = E_q[log p(x | z, c)] − KL(q(z | x, c) ‖ p(z)) ≤ log p(x | c), with one sample of z by the
reparameterisation trick z = mu + exp(logvar / 2)·ε.

Likelihood: a categorical distribution over the 17 grey levels of each pixel, independent given z,
so the ELBO bounds the *discrete* log-likelihood of the data and its bits/dim compare directly with a
dequantised flow's. Images served are the mean of p(x | z, c) (expected grey level / 16), not a draw
from it: pixel noise on top of the digit adds nothing to look at.

Training keeps a stratified tenth of the train split for validation and ships the checkpoint with
the best validation ELBO: at width 32 and weight decay 0.01 the held-out ELBO got worse after 1000
steps while the train ELBO kept improving, so the network is small (width 16) and decayed (0.1).
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
from genserve.models.image.digits import LEVELS, Split, validation_split
from genserve.models.image.generator import ImageGenerator

log = logging.getLogger(__name__)


@dataclass
class VAEConfig:
    latent_dim: int = 16
    width: int = 16  # channels at 8×8; 4×4 maps have 2·width, 2×2 maps 4·width
    classes: int = 10


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        w, k = config.width, config.classes
        self.encoder = nn.Sequential(
            nn.Conv2d(1 + k, w, 3, padding=1), nn.ELU(),  # (B, w, 8, 8)
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ELU(),  # (B, 2w, 4, 4)
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.ELU(),  # (B, 4w, 2, 2)
            nn.Flatten(), nn.Linear(16 * w, 2 * config.latent_dim),  # (B, 2Z)
        )
        self.from_latent = nn.Linear(config.latent_dim + k, 16 * w)
        self.decoder = nn.Sequential(
            nn.ELU(), nn.Unflatten(1, (4 * w, 2, 2)),  # (B, 4w, 2, 2)
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), nn.ELU(),  # (B, 2w, 4, 4)
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ELU(),  # (B, w, 8, 8)
            nn.Conv2d(w, LEVELS, 3, padding=1),  # (B, 17, 8, 8) logits over grey levels
        )

    def posterior(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu, logvar (B, Z) of q(z | x, c) for intensities x (B, 1, 8, 8) in [0, 1]."""
        onehot = F.one_hot(y, self.config.classes).to(x.dtype)[:, :, None, None].expand(-1, -1, 8, 8)
        return self.encoder(torch.cat([x, onehot], dim=1)).chunk(2, dim=1)

    def logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, Z), (B,) → (B, 17, 8, 8) logits of p(x | z, c)."""
        onehot = F.one_hot(y, self.config.classes).to(z.dtype)
        return self.decoder(self.from_latent(torch.cat([z, onehot], dim=1)))

    def images(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.logits(z, y).float().softmax(dim=1)  # (B, 17, 8, 8)
        levels = torch.arange(LEVELS, dtype=p.dtype, device=p.device)[None, :, None, None]
        return (p * levels).sum(1, keepdim=True) / (LEVELS - 1)  # (B, 1, 8, 8) mean intensity

    def elbo_terms(self, levels: torch.Tensor, y: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon, kl) per image (B,), nats: recon = −log p(x | z, c) at one z ~ q, kl = KL(q ‖ N(0, I))."""
        mu, logvar = self.posterior(levels / (LEVELS - 1), y)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation trick
        recon = F.cross_entropy(self.logits(z, y), levels[:, 0].long(), reduction="none").sum(dim=(1, 2))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return recon, kl

    @torch.no_grad()
    def iwae_log_likelihood(self, levels: torch.Tensor, y: torch.Tensor, k: int = 100,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x | c) per image (B,), nats (Burda et al. 2016): a tighter
        lower bound than the ELBO, approaching log p(x | c) as k grows."""
        mu, logvar = self.posterior(levels / (LEVELS - 1), y)
        std = torch.exp(0.5 * logvar)
        B, Z = mu.shape
        eps = torch.randn(k, B, Z, generator=generator, dtype=mu.dtype, device=mu.device)
        z = (mu + std * eps).reshape(k * B, Z)  # (k·B, Z)
        logits = self.logits(z, y.repeat(k))
        log_px = -F.cross_entropy(logits, levels[:, 0].long().repeat(k, 1, 1), reduction="none").sum(dim=(1, 2))
        log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(1)
        log_qz = (-0.5 * eps.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(2).reshape(k * B)
        w = (log_px + log_pz - log_qz).view(k, B)
        return torch.logsumexp(w, dim=0) - math.log(k)


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageGenerator:
    return ImageGenerator(load_net(path, VAEConfig, VAE, device, dtype), "image-vae")


def heldout_likelihoods(path: Path, held: Split, seed: int = 0) -> dict:
    """``genserve eval images``: the held-out ELBO and importance-weighted (k = 64) likelihood of the VAE
    saved in ``path``, in nats/image and bits/dim, given the class and marginal over the classes."""
    from genserve.models.image.evaluate import marginal_nll

    dims = 64 * math.log(2)
    net = load_net(path, VAEConfig, VAE)
    with torch.no_grad():
        recon, kl = net.elbo_terms(held.levels, held.labels, torch.Generator().manual_seed(seed))
    neg_elbo = (recon + kl).mean().item()

    def iwae_nll(y: torch.Tensor) -> torch.Tensor:
        return -net.iwae_log_likelihood(held.levels, y, k=64, generator=torch.Generator().manual_seed(seed))

    iwae = iwae_nll(held.labels).mean().item()
    marginal = marginal_nll(iwae_nll, held)
    return {"heldout_neg_elbo_nats": neg_elbo, "heldout_recon_nats": recon.mean().item(),
            "heldout_kl_nats": kl.mean().item(), "heldout_neg_elbo_bits_per_dim": neg_elbo / dims,
            "heldout_iwae_nll_nats": iwae, "heldout_iwae_bits_per_dim": iwae / dims,
            "heldout_iwae_bits_per_dim_marginal": marginal / dims}


@torch.no_grad()
def heldout_elbo(net: VAE, split: Split, seed: int = 0) -> tuple[float, float]:
    """(recon, kl) averaged over the split's images, nats/image; −ELBO = recon + kl."""
    recon, kl = net.eval().elbo_terms(split.levels, split.labels, torch.Generator().manual_seed(seed))
    return recon.mean().item(), kl.mean().item()


def make_tiny(path: Path) -> None:
    """A tiny seeded VAE saved in ``path`` (the family contract test's instance)."""
    torch.manual_seed(0)
    save_net(VAE(VAEConfig(latent_dim=4, width=8)), "image-vae", path)


# --- training -----------------------------------------------------------------------------------


@dataclass
class VAETrainConfig:
    minutes: float = 6.0
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1  # width 32 and decay 0.01 overfit 1437 images within 1000 steps
    kl_warmup: float = 0.1  # fraction of the budget over which the KL weight rises from 0 to 1
    seed: int = 0
    eval_every: int = 500


def fit(train: Split, held: Split, cfg: VAETrainConfig, config: VAEConfig | None = None) -> tuple[VAE, dict]:
    """Maximises the ELBO for ``cfg.minutes`` (or ``max_steps``) on 90 % of ``train``; returns the checkpoint
    with the best −ELBO on the other 10 % (the curve also logs ``held``, which chooses nothing)."""
    torch.manual_seed(cfg.seed)
    net = VAE(config or VAEConfig())
    fit_split, val = validation_split(train)

    def beta_at(progress: float) -> float:  # the KL weight, from 0 to 1 over the warm-up
        return min(1.0, progress / cfg.kl_warmup) if cfg.kl_warmup > 0 else 1.0

    def batch_loss(idx: torch.Tensor, g: torch.Generator, progress: float) -> tuple[torch.Tensor, float]:
        recon, kl = net.elbo_terms(fit_split.levels[idx], fit_split.labels[idx], g)
        return (recon + beta_at(progress) * kl).mean(), (recon + kl).mean().item()

    def evaluate(progress: float, train_neg_elbo: float) -> tuple[float | None, dict]:
        val_neg_elbo = sum(heldout_elbo(net, val, cfg.seed))
        h_recon, h_kl = heldout_elbo(net, held, cfg.seed)
        beta = beta_at(progress)
        return (val_neg_elbo if beta == 1.0 else None), {  # checkpoints count once the full ELBO is trained
            "beta": round(beta, 3), "train_neg_elbo": train_neg_elbo, "val_neg_elbo": val_neg_elbo,
            "heldout_neg_elbo": h_recon + h_kl, "heldout_recon": h_recon, "heldout_kl": h_kl}

    step, best_step, seconds, curve = train_loop(net, len(fit_split), cfg, batch_loss, evaluate)
    return net.eval(), {"steps": step, "best_step": best_step, "train_seconds": round(seconds, 1),
                        "fit_images": len(fit_split), "validation_images": len(val), "curve": curve}


def train(out: Path, minutes: float, seed: int = 0, threads: int = 1, max_steps: int | None = None,
          evaluate: bool = True) -> dict:
    """``genserve train vae``: trains, saves to ``out``, evaluates into the model card; the report."""
    from genserve.models.image.train import train_generator

    cfg = VAETrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    return train_generator("vae", out, cfg, fit, threads, evaluate)
