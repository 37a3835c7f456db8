"""The seed convention of every modality, in one place.

A request's seed is a 64-bit integer; every seed a model draws from is masked to 63 bits
(``SEED_MASK``: ``torch.Generator.manual_seed`` takes no larger value). Items of one request get
their own seeds so that an item draws the same numbers alone or inside any batch:

- text and molecules: sample ``i`` of a request with seed ``s`` draws from ``s + i * SEED_STRIDE``
  (:func:`sample_seed`), a golden-ratio stride that keeps the ``n`` seeds of one request far apart;
  a molecule round that starts after ``k`` strings were sampled has seed :func:`sample_seed` ``(s, k)``,
  so its string ``j`` is the request's sample ``k + j``;
- images: image ``k`` of a request uses ``s + k`` (:func:`item_seed`, wrapped within the API's seeds);
- speech: piece ``i`` of a long text uses ``s + i`` (:func:`item_seed`).

A request without a seed gets a fresh random one (:func:`seed_or_random`), reported back so the
caller can repeat the result: so it is drawn below ``2**52``, within the API's seeds (``MAX_REQUEST_SEED``,
the integers every JSON parser keeps exactly) with room for the item offsets above.
"""

from __future__ import annotations

import os

SEED_STRIDE = 0x9E3779B97F4A7C15
SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF
MAX_REQUEST_SEED = 2**53 - 1  # what a request's seed may be, either sign (app/schemas/base.py: Seed)
_RANDOM_SEED_MASK = 2**52 - 1


def random_seed() -> int:
    """A fresh seed from the operating system's entropy, below ``2**52`` (module docstring)."""
    return int.from_bytes(os.urandom(8), "little") & _RANDOM_SEED_MASK


def seed_or_random(seed: int | None) -> int:
    """The caller's seed, or a fresh random one."""
    return seed if seed is not None else random_seed()


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample ``i`` of a text or molecule request with seed ``seed``."""
    return (seed + SEED_STRIDE * i) & SEED_MASK


def item_seed(seed: int, k: int) -> int:
    """The seed of image ``k`` (or speech piece ``k``) of a request with seed ``seed``: ``seed + k``, wrapped
    within the API's seeds (``±MAX_REQUEST_SEED``), as it is reported back and may be sent again (a
    gateway forwards it to its upstream)."""
    span = 2 * MAX_REQUEST_SEED + 1
    return (seed + k + MAX_REQUEST_SEED) % span - MAX_REQUEST_SEED
