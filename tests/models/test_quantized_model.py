"""Weight-only quantization of the shipped model (int8, int4): memory, perplexity, and the engine on it."""

from __future__ import annotations

import pytest
import torch

from genserve.models.llama import load
from genserve.models.llama.evaluate import eval_text
from genserve.models.text.engine import EngineConfig, LLMEngine
from genserve.models.text.generate import generate
from genserve.models.text.sampling import SamplingParams
from tests.conftest import TEXT_DIR


def test_int8_is_3_5x_smaller_within_1_percent_and_int4_6x_within_3_percent() -> None:
    fp32, int8, int4 = eval_text(TEXT_DIR, ("none", "int8", "int4"), max_tokens=8192)
    assert int8["heldout_tokens"] == int4["heldout_tokens"] == fp32["heldout_tokens"] == 8192
    assert int8["memory_ratio"] >= 3.5, int8
    assert abs(int8["ppl_change"]) <= 0.01, (fp32["ppl"], int8["ppl"])
    # int4 (groups of 64, or 16 for the 688-wide down_proj): 6.27x and +1.9% on all 47k held-out tokens.
    assert int4["memory_ratio"] >= 6.0, int4
    assert 0 < int4["ppl_change"] <= 0.03, (fp32["ppl"], int4["ppl"])
    assert 5 < fp32["ppl"] < 20  # the model is the trained one, not noise (vocabulary 4096)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_engine_serves_the_quantized_model_like_the_reference_loop(quantization: str) -> None:
    tm = load(TEXT_DIR, torch.device("cpu"), torch.float32, quantization=quantization)
    assert not any(isinstance(m, torch.nn.Linear) for name, m in tm.model.named_modules() if name != "lm_head")
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context))
    prompts = ["The json module", "def read_file(path):"]
    tokens: dict[str, list[int]] = {}
    for p in prompts:
        engine.add_request(p, tm.tokenizer(p)["input_ids"], SamplingParams(max_tokens=24, temperature=0.0),
                           lambda ev, p=p: tokens.setdefault(p, []).extend(o.token.token_id for o in ev.outputs))
    while engine.has_work():
        engine.step()
    for p in prompts:
        params = SamplingParams(max_tokens=24, temperature=0.0)
        assert tokens[p] == [o[0].token.token_id for o in generate(tm, tm.tokenizer(p)["input_ids"], params)]
