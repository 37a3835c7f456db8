"""The reference generation loop on the shipped model: seeds, n, stops, min_tokens, abort."""

from __future__ import annotations

import pytest
import torch

from genserve.models.llama import load
from genserve.models.text.generate import generate
from genserve.models.text.sampling import SamplingParams
from tests.conftest import TEXT_DIR


@pytest.fixture(scope="module")
def tm():
    return load(TEXT_DIR, torch.device("cpu"), torch.float32)


def run(tm, params: SamplingParams, prompt: str = "The json module", abort=lambda: False):
    ids = tm.tokenizer(prompt)["input_ids"]
    texts, tokens, finish = {}, {}, {}
    for outs in generate(tm, ids, params, abort):
        for o in outs:
            texts[o.index] = texts.get(o.index, "") + o.text
            tokens.setdefault(o.index, []).append(o.token.token_id)
            if o.finish_reason:
                finish[o.index] = o.finish_reason
    return texts, tokens, finish


def test_seeded_samples_do_not_depend_on_n(tm) -> None:
    one = run(tm, SamplingParams(max_tokens=20, seed=9, n=1, ignore_eos=True))
    three = run(tm, SamplingParams(max_tokens=20, seed=9, n=3, ignore_eos=True))
    assert three[1][0] == one[1][0]  # sample 0 is the same alone or with siblings
    assert len({tuple(t) for t in three[1].values()}) == 3
    assert three[2] == {0: "length", 1: "length", 2: "length"}


def test_min_tokens_and_eos(tm) -> None:
    _, tokens, _ = run(tm, SamplingParams(max_tokens=30, temperature=0.0, min_tokens=30))
    assert len(tokens[0]) == 30 and not set(tokens[0]) & tm.eos_ids


def test_abort_stops_between_steps(tm) -> None:
    steps = 0

    def abort() -> bool:
        nonlocal steps
        steps += 1
        return steps > 5

    _, tokens, finish = run(tm, SamplingParams(max_tokens=200, ignore_eos=True, seed=0), abort=abort)
    assert len(tokens[0]) <= 5 and not finish


def test_stop_string_truncates(tm) -> None:
    full, _, _ = run(tm, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    stop = full[0][10:13]
    texts, _, finish = run(tm, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert texts[0] == full[0][: full[0].index(stop)] and finish[0] == "stop"
