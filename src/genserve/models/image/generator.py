"""Our own image generators, trained here on scikit-learn's handwritten digits: ``genserve-gan``,
``genserve-vae`` and ``genserve-flow`` (families ``gan``, ``image-vae``, ``flow``).

Each module (``gan.py``, ``vae.py``, ``flow.py``) holds one network and a ``load(path, device, dtype)``
that returns an :class:`ImageGenerator`, the one interface the serving layer uses:

- ``latents(seeds)`` → (B, latent_dim) float32 on the CPU, row i drawn from
  ``torch.Generator().manual_seed(seeds[i])`` alone, times ``latent_scale`` (1 for the GAN's noise and
  the VAE's prior, the sampling temperature for the flow's base Gaussian);
- ``decode(latents, classes)`` → (B, 8, 8, 1) uint8; ``sample(seeds, classes)`` = ``decode(latents(seeds), classes)``.

Images keep scikit-learn's convention: ink is the high value, so a digit is light on a dark
ground (like MNIST); grey level g of 0..16 is pixel ``round(255 * g / 16)``.

A class of None means the class :func:`class_from_latent` reads off the latent: ⌊10·Φ(z₀ / scale)⌋,
uniform over the ten digits for latents from ``latents`` and a fixed function of the seed.

A batch decodes in one forward pass. A convolution may pick a different kernel for a different
batch size, and the last bit of a float can then flip a pixel's rounding, so at load the layers
that do so on this machine are found and made to run row by row
(:func:`models.batch_invariance.make_batch_invariant`): a row decodes to the same bytes alone or
in any batch of up to ``MAX_ROWS``; larger batches are decoded in chunks of ``MAX_ROWS``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from genserve.models.batch_invariance import make_batch_invariant, probe_rows

SIZE = (8, 8)
MAX_ROWS = 64  # rows decoded in one forward pass (and probed for batch invariance at load)
CLASS_NAMES = [str(d) for d in range(10)]


class ImageNet(Protocol):
    """What a generator network offers :class:`ImageGenerator`."""

    config: Any

    def images(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) latents and (B,) class ids → (B, 1, 8, 8) intensities in [0, 1], ink = 1."""
        ...


class ImageGenerator:
    """A loaded generator as the serving layer sees it: seeds → latents → uint8 images."""

    size: tuple[int, int] = SIZE
    channels: int = 1

    def __init__(self, net: nn.Module, family: str, latent_scale: float = 1.0) -> None:
        self.net = net.eval()
        self.family = family
        self.latent_scale = latent_scale
        self.class_names = list(CLASS_NAMES)
        self.latent_dim: int = net.config.latent_dim
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._make_batch_invariant()

    def _make_batch_invariant(self) -> None:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(MAX_ROWS, self.latent_dim, generator=g).to(self.device, self.dtype)
        y = torch.arange(MAX_ROWS, device=self.device) % len(self.class_names)

        def probe(n: int) -> torch.Tensor:
            rows = probe_rows(n)
            return self.net.images(z[rows], y[rows])

        _, invariant = make_batch_invariant(self.net, probe, MAX_ROWS)
        self.rows_per_pass = MAX_ROWS if invariant else 1  # an op outside the probed layers varied: one by one

    def latents(self, seeds: list[int]) -> torch.Tensor:
        rows = [torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        if not rows:
            return torch.zeros(0, self.latent_dim)
        return torch.stack(rows) * self.latent_scale  # (B, latent_dim)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, classes: list[int | None]) -> np.ndarray:
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim:
            raise ValueError(f"latents must have shape (B, {self.latent_dim}), got {tuple(latents.shape)}")
        if len(classes) != latents.shape[0]:
            raise ValueError(f"got {len(classes)} classes for {latents.shape[0]} latents")
        z = latents.float()
        y = torch.tensor([class_from_latent(z[i], self.latent_scale) if c is None else check_class(c)
                          for i, c in enumerate(classes)], dtype=torch.long)
        n = self.rows_per_pass
        chunks = [self.net.images(z[i:i + n].to(self.device, self.dtype), y[i:i + n].to(self.device))
                  for i in range(0, len(classes), n)]  # each (b, 1, 8, 8)
        return to_uint8(torch.cat(chunks)) if chunks else np.zeros((0, *self.size, self.channels), np.uint8)

    def sample(self, seeds: list[int], classes: list[int | None]) -> np.ndarray:
        return self.decode(self.latents(seeds), classes)


def check_class(c: int) -> int:
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(CLASS_NAMES):
        raise ValueError(f"class must be an int in 0..{len(CLASS_NAMES) - 1} or None, got {c!r}")
    return c


def class_from_latent(z: torch.Tensor, scale: float = 1.0) -> int:
    """⌊10·Φ(z₀ / scale)⌋: a uniform digit for a Gaussian latent, the same whatever the batch."""
    u = 0.5 * (1 + math.erf(float(z[0]) / scale / math.sqrt(2)))
    return min(int(u * len(CLASS_NAMES)), len(CLASS_NAMES) - 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) intensities in [0, 1] → (B, H, W, 1) uint8."""
    x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
