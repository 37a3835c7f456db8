"""``genserve-gan``: a class-conditional DCGAN for 8×8 digits (family ``gan``).

Radford et al. 2016, "Unsupervised representation learning with deep convolutional generative
adversarial networks" (DCGAN): an all-convolutional generator that upsamples a noise vector, against
a convolutional discriminator. The discriminator is stabilised with spectral normalisation of every
layer (Miyato et al. 2018, "Spectral normalization for generative adversarial networks") and trained
with the hinge loss of that paper; it sees the class through a projection (Miyato & Koyama 2018,
"cGANs with projection discriminator"): D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩. The generator sees the
class as a learned embedding concatenated to the noise and to every hidden feature map.

The generator has no batch norm, so an image depends on its own noise and class only. The shipped
weights are an exponential moving average of the generator's (Yazıcı et al. 2019, "The unusual
effectiveness of averaging in GAN training"); the discriminator is not shipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genserve.models.common.training import lr_at, set_lr, snapshot
from genserve.models.common.weights import load_net, save_net
from genserve.models.image.digits import Split
from genserve.models.image.generator import ImageGenerator

log = logging.getLogger(__name__)


@dataclass
class GANConfig:
    latent_dim: int = 32
    width: int = 64  # channels of the 4×4 maps; 2×2 maps have 2·width, 8×8 maps width/2
    class_dim: int = 16
    classes: int = 10


class Generator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        self.config = config
        w, e = config.width, config.class_dim
        self.embed = nn.Embedding(config.classes, e)
        self.fc = nn.Linear(config.latent_dim + e, 2 * w * 4)
        self.up1 = nn.Conv2d(2 * w + e, w, 3, padding=1)
        self.up2 = nn.Conv2d(w + e, w // 2, 3, padding=1)
        self.out = nn.Conv2d(w // 2 + e, 1, 3, padding=1)

    @staticmethod
    def _with_class(h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, e[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)  # (B, C + E, H, W)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) noise, (B,) classes → (B, 1, 8, 8) in [-1, 1]."""
        e = self.embed(y)  # (B, E)
        h = F.relu(self.fc(torch.cat([z, e], dim=1))).view(z.shape[0], -1, 2, 2)  # (B, 2w, 2, 2)
        h = F.relu(self.up1(self._with_class(F.interpolate(h, scale_factor=2), e)))  # (B, w, 4, 4)
        h = F.relu(self.up2(self._with_class(F.interpolate(h, scale_factor=2), e)))  # (B, w/2, 8, 8)
        return torch.tanh(self.out(self._with_class(h, e)))  # (B, 1, 8, 8)

    def images(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self(z, y) + 1) / 2  # (B, 1, 8, 8) in [0, 1]


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig) -> None:
        super().__init__()
        w = config.width
        self.convs = nn.Sequential(
            spectral_norm(nn.Conv2d(1, w // 2, 3, padding=1)), nn.LeakyReLU(0.2),  # (B, w/2, 8, 8)
            spectral_norm(nn.Conv2d(w // 2, w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # (B, w, 4, 4)
            spectral_norm(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),  # (B, 2w, 2, 2)
        )
        self.psi = spectral_norm(nn.Linear(2 * w, 1))
        self.embed = spectral_norm(nn.Embedding(config.classes, 2 * w))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) in [-1, 1], (B,) classes → (B,) realness scores."""
        phi = self.convs(x).sum(dim=(2, 3))  # (B, 2w)
        return self.psi(phi)[:, 0] + (self.embed(y) * phi).sum(1)


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageGenerator:
    return ImageGenerator(load_net(path, GANConfig, Generator, device, dtype), "gan")


def make_tiny(path: Path) -> None:
    """A tiny seeded generator saved in ``path`` (the family contract test's instance)."""
    torch.manual_seed(0)
    save_net(Generator(GANConfig(latent_dim=8, width=8, class_dim=4)), "gan", path)


# --- training -----------------------------------------------------------------------------------


@dataclass
class GANTrainConfig:
    minutes: float = 12.0
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.0, 0.9)
    d_steps: int = 2  # discriminator updates per generator update
    ema: float = 0.999
    seed: int = 0
    log_every: int = 500


def fit(train: Split, held: Split, cfg: GANTrainConfig, config: GANConfig | None = None) -> tuple[Generator, dict]:
    """Hinge-loss GAN for ``cfg.minutes`` (or ``max_steps`` generator steps); returns the EMA generator."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    config = config or GANConfig()
    G, D = Generator(config), Discriminator(config)
    ema = Generator(config).eval()
    ema.load_state_dict(snapshot(G))
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    x_all, y_all = train.unit() * 2 - 1, train.labels  # (N, 1, 8, 8) in [-1, 1]
    curve, window, step, start = [], [], 0, time.time()
    while True:
        progress = (time.time() - start) / (cfg.minutes * 60)
        for opt in (opt_g, opt_d):
            set_lr(opt, lr_at(cfg, step, progress))
        for _ in range(cfg.d_steps):
            idx = torch.randint(0, len(train), (cfg.batch_size,), generator=g)
            z = torch.randn(cfg.batch_size, config.latent_dim, generator=g)
            with torch.no_grad():
                fake = G(z, y_all[idx])
            d_loss = F.relu(1 - D(x_all[idx], y_all[idx])).mean() + F.relu(1 + D(fake, y_all[idx])).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        y = torch.randint(0, config.classes, (cfg.batch_size,), generator=g)
        z = torch.randn(cfg.batch_size, config.latent_dim, generator=g)
        g_loss = -D(G(z, y), y).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), G.parameters(), strict=True):
                p_ema.lerp_(p, 1 - cfg.ema)
        step += 1
        window.append((d_loss.item(), g_loss.item()))
        last = step == cfg.max_steps or progress >= 1
        if step % cfg.log_every == 0 or last:
            d_mean, g_mean = (sum(w[i] for w in window) / len(window) for i in range(2))
            curve.append({"step": step, "seconds": round(time.time() - start, 1), "d_loss": d_mean, "g_loss": g_mean})
            log.info("step %d  %.0fs  D hinge %.3f  G %.3f", step, time.time() - start, d_mean, g_mean)
            window = []
        if last:
            break
    return ema, {"steps": step, "train_seconds": round(time.time() - start, 1), "curve": curve}


def train(out: Path, minutes: float, seed: int = 0, threads: int = 1, max_steps: int | None = None,
          evaluate: bool = True) -> dict:
    """``genserve train gan``: trains, saves to ``out``, evaluates into the model card; the report."""
    from genserve.models.image.train import train_generator

    cfg = GANTrainConfig(minutes=minutes, seed=seed, max_steps=max_steps)
    return train_generator("gan", out, cfg, fit, threads, evaluate)
