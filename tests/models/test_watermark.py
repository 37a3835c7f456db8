"""The text watermark (models/text/watermark.py): transformers' green lists and detector agree with
ours, the sampler raises the green share by the expected amount, greedy rows are untouched, and
text made without the key is not detected."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from transformers import LlamaConfig
from transformers.generation.watermarking import WatermarkDetector, WatermarkLogitsProcessor

from genserve.models.text.sampling import SampleRow, SamplingParams, sample_batch
from genserve.models.text.watermark import Watermark, detect, green_lists, key_from_secret

V = 4096
MARK = Watermark(key=key_from_secret("test secret"))


def draw(logits: torch.Tensor, params: SamplingParams, steps: int, first: int = 5) -> list[int]:
    """``steps`` tokens drawn one by one from ``logits`` (steps, V), each keyed by the one before."""
    gen = torch.Generator().manual_seed(0)
    out = [first]
    for t in range(steps):
        out += sample_batch(logits[t][None], [SampleRow(params, gen, [first], out[1:])])
    return out


def test_green_lists_are_transformers_lefthash_lists() -> None:
    ref = WatermarkLogitsProcessor(vocab_size=V, device="cpu", greenlist_ratio=MARK.gamma, bias=MARK.delta,
                                   hashing_key=MARK.key, seeding_scheme="lefthash", context_width=1)
    lists = green_lists(MARK, V)
    for prev in (1, 7, 300, 4095):
        ours = set(lists.mask(prev).nonzero()[:, 0].tolist())
        assert ours == set(ref._get_greenlist_ids(torch.tensor([prev])).tolist())
        assert len(ours) == V // 4


def test_our_detector_scores_as_transformers_detector() -> None:
    logits = torch.randn(300, V, generator=torch.Generator().manual_seed(1)) * 2
    tokens = draw(logits, SamplingParams(temperature=1.0, watermark=MARK), 300)
    ours = detect(tokens, MARK, V)
    config = LlamaConfig(vocab_size=V, bos_token_id=V - 1)  # no sequence here starts with it
    ref = WatermarkDetector(config, "cpu", {"greenlist_ratio": MARK.gamma, "bias": MARK.delta,
                                            "hashing_key": MARK.key, "seeding_scheme": "lefthash",
                                            "context_width": 1}, ignore_repeated_ngrams=True)
    theirs = ref(torch.tensor([tokens]), return_dict=True)
    assert ours.tokens_scored == int(theirs.num_tokens_scored[0])
    assert ours.green_tokens == int(theirs.num_green_tokens[0])
    assert ours.z_score == pytest.approx(float(theirs.z_score[0]))
    assert ours.detected and ours.z_score > 10


def test_the_bias_raises_the_green_share_as_the_paper_says_and_greedy_stays_greedy() -> None:
    flat = torch.zeros(2000, V)  # every token equally likely: the green share is gamma e^delta / (...)
    tokens = draw(flat, SamplingParams(temperature=1.0, watermark=MARK), 2000)
    lists = green_lists(MARK, V)
    share = sum(bool(lists.mask(a)[b]) for a, b in pairwise(tokens)) / 2000
    g, e = MARK.gamma, math.exp(MARK.delta)
    assert share == pytest.approx(g * e / (g * e + 1 - g), abs=0.03)  # 0.711
    logits = torch.randn(50, V, generator=torch.Generator().manual_seed(2))
    marked = draw(logits, SamplingParams(temperature=0.0, watermark=MARK), 50)
    assert marked == draw(logits, SamplingParams(temperature=0.0), 50) == [5, *logits.argmax(-1).tolist()]


def test_a_seeded_row_draws_the_same_beside_rows_of_other_keys() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.9, watermark=MARK), SamplingParams(temperature=0.9),
              SamplingParams(temperature=0.9, watermark=Watermark(key=7))]
    rows = lambda: [SampleRow(p, torch.Generator().manual_seed(4), [i + 1], []) for i, p in enumerate(params)]  # noqa: E731
    together = sample_batch(logits, rows())
    alone = [sample_batch(logits[i][None], [rows()[i]])[0] for i in range(3)]
    assert together == alone


def test_text_made_without_the_key_is_not_detected() -> None:
    gen = torch.Generator().manual_seed(5)
    zs = [detect(torch.randint(0, V, (200,), generator=gen).tolist(), MARK, V).z_score for _ in range(1000)]
    assert sum(z > MARK.z_threshold for z in zs) == 0  # 0.03 expected at z > 4
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / len(zs))
    assert abs(mean) < 0.1 and 0.9 < sd < 1.1  # the z-score is a standard normal under the null
    tokens = draw(torch.zeros(200, V), SamplingParams(temperature=1.0, watermark=MARK), 200)
    assert detect(tokens, MARK, V).detected
    assert not detect(tokens, Watermark(key=key_from_secret("another secret")), V).detected


def test_short_or_empty_sequences_score_zero_and_out_of_vocabulary_ids_are_skipped() -> None:
    assert detect([], MARK, V).tokens_scored == 0 and not detect([3], MARK, V).detected
    assert detect([1, 2, V, -1, 3], MARK, V).tokens_scored == 1  # only (1, 2) lies inside the vocabulary
