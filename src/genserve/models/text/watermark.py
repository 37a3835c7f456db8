"""The text watermark: a keyed green list (Kirchenbauer et al. 2023, "A Watermark for Large Language
Models"), applied per row inside the engine's sampler and detected from the text alone.

Before each draw, the vocabulary is split by a permutation seeded with ``key * previous token``: its
first ``gamma`` share is green, and green logits get ``+delta``. Text made so has more green tokens
than chance; text written without the key has a ``gamma`` share, so a one-sided z-test on the
green count tells them apart. This is the "lefthash" scheme of transformers'
``WatermarkLogitsProcessor`` with a context of one token, permutation for permutation: its
``WatermarkDetector`` scores our output as ours does (``tests/models/test_watermark.py``).

Why per row in the sampler: the bias depends only on the row's own previous token, so a seeded
request draws the same tokens alone or batched with anything. Greedy rows are left alone (greedy
stays greedy, and is then not watermarked). The permutation is drawn on the CPU whatever device
the engine runs on, because ``torch.randperm`` differs between devices and detection runs on the
gateway's CPU.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

SCHEME = "kirchenbauer-lefthash-v1"


@dataclass(frozen=True)
class Watermark:
    """The watermark's parameters: what the sampler applies and the detector must be given again."""

    key: int  # the secret: a positive integer (``key_from_secret``)
    gamma: float = 0.25  # the green share of the vocabulary
    delta: float = 2.0  # the bias added to green logits
    z_threshold: float = 4.0  # detection: z above this (one-sided p < 3.2e-5) is "watermarked"


def key_from_secret(secret: str) -> int:
    """A 63-bit key from the operator's secret (SHA-256, so any string serves)."""
    return int.from_bytes(hashlib.sha256(secret.encode()).digest()[:8], "big") >> 1 or 1


class GreenLists:
    """The green lists of one key and vocabulary size, as boolean masks, cached by previous token.

    The cache is bounded by bytes: a 4,096-token vocabulary keeps every list (16 MiB), a 128k one
    keeps the most recent few hundred.
    """

    def __init__(self, mark: Watermark, vocab_size: int, max_bytes: int = 64 << 20) -> None:
        self.mark, self.vocab_size = mark, vocab_size
        self.size = int(vocab_size * mark.gamma)
        self.capacity = max(1, max_bytes // max(1, vocab_size))
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # detections run on worker threads

    def mask(self, prev: int) -> torch.Tensor:
        """(V,) bool on the CPU: True where a token is green after ``prev``."""
        with self._lock:
            hit = self._cache.get(prev)
            if hit is not None:
                self._cache.move_to_end(prev)
                return hit
        rng = torch.Generator(device="cpu").manual_seed((self.mark.key * prev) % (2**64 - 1))
        green = torch.zeros(self.vocab_size, dtype=torch.bool)
        green[torch.randperm(self.vocab_size, generator=rng)[: self.size]] = True
        with self._lock:
            self._cache[prev] = green
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return green

    def bias(self, logits: torch.Tensor, prevs: Sequence[int]) -> torch.Tensor:
        """``logits`` (B, V) with ``delta`` added to each row's green tokens after its ``prevs[b]``."""
        masks = torch.stack([self.mask(p) for p in prevs]).to(logits.device)
        return logits.add(masks, alpha=self.mark.delta)


_LISTS: dict[tuple[Watermark, int], GreenLists] = {}


def green_lists(mark: Watermark, vocab_size: int) -> GreenLists:
    """The process's cache of one key and vocabulary (each engine process keeps its own; so does the gateway,
    for detection)."""
    lists = _LISTS.get((mark, vocab_size))
    if lists is None:
        lists = _LISTS[(mark, vocab_size)] = GreenLists(mark, vocab_size)
    return lists


@dataclass
class Detection:
    tokens_scored: int  # distinct (previous, next) token pairs
    green_tokens: int
    z_score: float
    p_value: float
    detected: bool

    @property
    def green_fraction(self) -> float:
        return self.green_tokens / self.tokens_scored if self.tokens_scored else 0.0


def detect(token_ids: Sequence[int], mark: Watermark, vocab_size: int, max_pairs: int = 4096) -> Detection:
    """Scores a token sequence: how many of its distinct bigrams end on a green token.

    At most ``max_pairs`` distinct pairs are scored, the first ones (far more than a verdict needs:
    200 tokens give z of 8-9 on marked text), so a long text costs at most that many green lists.

    Each distinct (previous, next) pair counts once (transformers' ``ignore_repeated_ngrams``):
    a repeated phrase has the same colour every time, so counting it again would only inflate the
    z-score of any repetitive text, human or not. Out-of-vocabulary ids are skipped.
    """
    lists = green_lists(mark, vocab_size)
    pairs: set[tuple[int, int]] = set()
    for a, b in pairwise(token_ids):
        if 0 <= a < vocab_size and 0 <= b < vocab_size:
            pairs.add((a, b))
            if len(pairs) >= max_pairs:
                break
    green = sum(bool(lists.mask(a)[b]) for a, b in pairs)
    n, g = len(pairs), mark.gamma
    z = (green - g * n) / math.sqrt(n * g * (1 - g)) if n else 0.0
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return Detection(n, green, z, p, n > 0 and z > mark.z_threshold)
