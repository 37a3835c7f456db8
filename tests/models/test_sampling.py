"""Sampling processors, seeds, incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from genserve.models.text.detokenize import IncrementalDetokenizer, StopMatcher
from genserve.models.text.sampling import (
    SamplingParams,
    apply_penalties,
    filter_batch,
    filter_logits,
    make_generators,
    sample,
)
from tests.conftest import TEXT_DIR

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])


def draws(params: SamplingParams, k: int = 200) -> set[int]:
    g = make_generators(params)[0]
    return {sample(LOGITS, params, g, [], []) for _ in range(k)}


def test_greedy_top_k_top_p_min_p() -> None:
    assert draws(SamplingParams(temperature=0.0)) == {0}
    assert draws(SamplingParams(top_k=1, seed=0)) == {0}
    assert draws(SamplingParams(top_k=2, seed=0)) == {0, 1}
    # Probabilities ≈ [.61, .22, .14, .03, .004]: top_p=0.7 keeps the first two, 0.9 the first three.
    assert draws(SamplingParams(top_p=0.7, seed=0)) == {0, 1}
    assert draws(SamplingParams(top_p=0.9, seed=0)) == {0, 1, 2}
    assert draws(SamplingParams(min_p=0.3, seed=0)) == {0, 1}  # 0.22/0.61 > 0.3 > 0.14/0.61
    assert len(draws(SamplingParams(seed=0), 2000)) == 5


def test_penalties_follow_their_definitions() -> None:
    p = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(LOGITS, p, prompt_ids=[0], output_ids=[3])
    assert out.tolist() == [1.0, 1.0, 0.5, -2.0, -3.0]  # positive divided, negative multiplied
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(LOGITS, p, prompt_ids=[1], output_ids=[2, 2, 4])  # the prompt does not count
    assert torch.allclose(out, torch.tensor([2.0, 1.0, 0.5 - 0.5 - 0.5, -1.0, -3.0 - 0.5 - 0.25]))
    p = SamplingParams(logit_bias={4: 100.0})
    assert draws(p) == {4}


def test_temperature_scales_before_filtering() -> None:
    cold = filter_logits(LOGITS, SamplingParams(temperature=0.5)).softmax(-1)
    hot = filter_logits(LOGITS, SamplingParams(temperature=2.0)).softmax(-1)
    assert cold[0] > LOGITS.softmax(-1)[0] > hot[0]


def test_seeds_are_per_sample_and_reproducible() -> None:
    a, b = make_generators(SamplingParams(seed=5, n=2)), make_generators(SamplingParams(seed=5, n=3))
    seq = [[int(torch.randint(0, 1000, (1,), generator=g)) for _ in range(5)] for g in (a[0], a[1], b[0], b[1])]
    assert seq[0] == seq[2] and seq[1] == seq[3] and seq[0] != seq[1]


def test_stop_matcher_holds_back_and_cuts_across_pieces() -> None:
    m = StopMatcher(["o W", "zzz"])
    released = [m.feed("Hel"), m.feed("lo Wo"), m.feed("rld")]
    assert "".join(released) == "Hell" and m.stopped and m.flush() == ""
    assert all("o W" not in r for r in released)
    m = StopMatcher(["END"])
    # Only a tail that can still become "END" is held; without a stop, flush releases it.
    assert m.feed("abcE") == "abc" and m.feed("N") == "" and m.flush() == "EN"


def test_incremental_detokenizer_never_splits_characters() -> None:
    tok = AutoTokenizer.from_pretrained(TEXT_DIR)
    text = "naïve café ☕ — 🙂 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, tok("Say:")["input_ids"])
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda() -> None:
    params = SamplingParams(seed=1, presence_penalty=0.5, repetition_penalty=1.2, top_p=0.9, top_k=3)
    g = make_generators(params, "cuda")[0]
    tok = sample(LOGITS.cuda(), params, g, prompt_ids=[0], output_ids=[1, 1])
    assert 0 <= tok < 5


def reference_filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The textbook order on one row with a full sort: temperature, top-k, top-p, min-p."""
    x = row / p.temperature
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        s, order = torch.sort(x, descending=True)
        probs = s.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return x


def test_an_unfiltered_row_keeps_its_whole_vocabulary_beside_filtered_ones() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 4096)
    plain = SamplingParams(temperature=0.9)
    for neighbour in (SamplingParams(top_k=5), SamplingParams(top_p=0.5), SamplingParams(min_p=0.2)):
        out = filter_batch(logits, [plain, neighbour, SamplingParams(min_p=0.05), plain])
        assert not out[0].isinf().any() and not out[3].isinf().any(), neighbour
        assert torch.equal(out[1], filter_batch(logits[1:2], [neighbour])[0])


def test_batched_filters_equal_the_textbook_order_row_by_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 4096) * 3
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=7), SamplingParams(top_p=0.5, top_k=100, temperature=0.7),
              SamplingParams(min_p=0.05, top_p=0.8), SamplingParams(), SamplingParams(top_p=0.9999),  # beyond prefix
              SamplingParams(top_k=3000, top_p=0.95, temperature=1.5)]
    batched = filter_batch(logits, params)
    for row, p, got in zip(logits, params, batched, strict=True):
        want = reference_filter(row, p)
        differ = got.isinf() != want.isinf()
        if differ.any():  # only where the mass ahead equals top_p up to float summation order
            x = row / p.temperature
            ahead = x.softmax(-1)[x > x[differ].max()].sum()
            assert p.top_k == 0 and differ.sum() == 1 and abs(ahead - p.top_p) < 1e-5, p
        kept = ~got.isinf() & ~want.isinf()
        assert torch.allclose(got[kept], want[kept])
