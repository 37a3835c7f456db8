"""The continuous-batching engine: parity with transformers, seeds in a shared batch, preemption,
abort, and a KV cache that never grows."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from genserve.app.moderation.text import TermHalt
from genserve.models.llama import load
from genserve.models.text.engine import EngineConfig, EngineError, LLMEngine, RequestEvent
from genserve.models.text.generate import TextModel, generate
from genserve.models.text.sampling import SamplingParams
from genserve.models.text.watermark import Watermark
from tests.conftest import TEXT_DIR

PROMPTS = ["The json module", "def", "Return a new list containing all items from the iterable in ascending order",
           "class Foo:\n    def __init__(self):", "What does os.path.join do?"]


@pytest.fixture(scope="module")
def tm() -> TextModel:
    return load(TEXT_DIR, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def scaled_dir(tmp_path_factory) -> Path:
    """A random Llama saved by transformers, unlike the shipped one: untied lm_head, llama3 RoPE
    scaling, GQA 4:1, head_dim 16, its own rope_theta."""
    path = tmp_path_factory.mktemp("llama3-like")
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    for f in TEXT_DIR.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
            shutil.copy(f, path / f.name)
    return path


class Collector:
    """Gathers every request's events as the engine delivers them."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[int, list[int]]] = {}
        self.text: dict[str, dict[int, str]] = {}
        self.finish: dict[str, dict[int, str]] = {}
        self.events: dict[str, list[RequestEvent]] = {}

    def __call__(self, rid: str):
        def on_event(ev: RequestEvent) -> None:
            self.events.setdefault(rid, []).append(ev)
            for o in ev.outputs:
                self.tokens.setdefault(rid, {}).setdefault(o.index, []).append(o.token.token_id)
                self.text.setdefault(rid, {})[o.index] = self.text.get(rid, {}).get(o.index, "") + o.text
                if o.finish_reason:
                    self.finish.setdefault(rid, {})[o.index] = o.finish_reason
        return on_event


def run_all(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]], tm: TextModel) -> Collector:
    got = Collector()
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, tm.tokenizer(prompt)["input_ids"], params, got(rid))
    while engine.has_work():
        engine.step()
    return got


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("which", ["shipped", "llama3-scaled"])
def test_logits_match_transformers_at_prefill_and_decode(which: str, tm: TextModel, scaled_dir: Path) -> None:
    path = TEXT_DIR if which == "shipped" else scaled_dir
    ours = tm if which == "shipped" else load(path, torch.device("cpu"), torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = LLMEngine(ours, EngineConfig(block_size=8, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=512))
    prompts = {f"r{i}": ours.tokenizer(p)["input_ids"] for i, p in enumerate(PROMPTS)}
    got = Collector()
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, greedy(32), got(rid))
    worst, steps = 0.0, 0
    with torch.inference_mode():
        while engine.has_work():
            engine.step()
            steps += 1
            for row, (rid, _) in enumerate(engine.last_scheduled):
                *seq, token = prompts[rid] + got.tokens[rid][0]  # what the engine just ran, and its pick
                ref = hf(torch.tensor([seq])).logits[0, -1]  # transformers, no cache, one sequence
                worst = max(worst, (engine.last_logits[row] - ref).abs().max().item())
                assert token == int(ref.argmax()), (rid, steps)  # greedy tokens identical
    assert steps == 32  # every request prefilled in step 1, then 31 shared decode steps
    assert all(len(got.tokens[rid][0]) == 32 for rid in prompts)
    assert worst <= 1e-4, worst


def test_greedy_agrees_with_the_reference_loop(tm: TextModel) -> None:
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context))
    got = run_all(engine, {f"r{i}": (p, greedy(24)) for i, p in enumerate(PROMPTS)}, tm)
    for i, p in enumerate(PROMPTS):
        ref = [o[0].token.token_id for o in generate(tm, tm.tokenizer(p)["input_ids"], greedy(24))]
        assert got.tokens[f"r{i}"][0] == ref


def mixed_batch() -> dict[str, tuple[str, SamplingParams]]:
    """Fifteen requests with every sampling feature, to surround the one under test."""
    kinds = [greedy(20), SamplingParams(max_tokens=30, top_p=0.8, seed=3),
             SamplingParams(max_tokens=12, top_k=5, temperature=1.3, n=2),
             SamplingParams(max_tokens=25, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
             SamplingParams(max_tokens=40, min_p=0.1, logprobs=3, stop=["."]),
             SamplingParams(max_tokens=18, min_tokens=10, temperature=0.7, logit_bias={65: 3.0}),
             SamplingParams(max_tokens=22, temperature=0.8, watermark=Watermark(key=99))]
    return {f"other{i}": (PROMPTS[i % len(PROMPTS)] * (1 + i % 3), kinds[i % len(kinds)]) for i in range(15)}


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=48, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True, n=2,
                   repetition_penalty=1.1),
    SamplingParams(max_tokens=48, seed=7, ignore_eos=True, n=2),  # no filter of its own, beside filtered rows
    SamplingParams(max_tokens=48, temperature=0.8, seed=11, ignore_eos=True, n=2, watermark=Watermark(key=12345)),
], ids=["filtered", "plain", "watermarked"])
def test_seeded_request_draws_the_same_tokens_alone_and_in_a_batch_of_16(tm: TextModel,
                                                                          params: SamplingParams) -> None:
    alone = run_all(LLMEngine(tm, EngineConfig.for_model(tm.context)), {"me": ("The json module", params)}, tm)
    batch = mixed_batch() | {"me": ("The json module", params)}
    together = run_all(LLMEngine(tm, EngineConfig.for_model(tm.context)), batch, tm)
    assert together.tokens["me"] == alone.tokens["me"]
    assert len(alone.tokens["me"][0]) == 48 and alone.tokens["me"][0] != alone.tokens["me"][1]
    assert len(together.tokens) == 16


def test_preemption_recomputes_and_keeps_results(tm: TextModel) -> None:
    requests = {f"r{i}": (PROMPTS[i % len(PROMPTS)], greedy(60)) for i in range(8)}
    roomy = run_all(LLMEngine(tm, EngineConfig(block_size=8, num_blocks=512)), requests, tm)
    tight = LLMEngine(tm, EngineConfig(block_size=8, num_blocks=24, max_num_batched_tokens=512))
    preempted, got = 0, Collector()
    for rid, (p, params) in requests.items():
        tight.add_request(rid, tm.tokenizer(p)["input_ids"], params, got(rid))
    pointers = [k.data_ptr() for k, _ in tight.kv_caches]
    while tight.has_work():
        preempted += tight.step().num_preemptions
        assert tight.allocator.num_free >= 0
    assert preempted > 0
    assert got.tokens == roomy.tokens
    assert [k.data_ptr() for k, _ in tight.kv_caches] == pointers  # allocated once, never regrown
    assert tight.allocator.num_free == 24


def test_abort_frees_blocks_at_the_next_step(tm: TextModel) -> None:
    engine = LLMEngine(tm, EngineConfig(block_size=8, num_blocks=64))
    got = Collector()
    for rid in ("keep", "drop"):
        engine.add_request(rid, tm.tokenizer(PROMPTS[2])["input_ids"], greedy(40), got(rid))
    for _ in range(5):
        engine.step()
    used_by_one = (64 - engine.allocator.num_free) // 2
    engine.abort("drop")
    stats = engine.step()
    assert got.events["drop"][-1].aborted and got.events["drop"][-1].completion_tokens == 5
    assert stats.running == 1 and 64 - engine.allocator.num_free <= used_by_one + 1
    steps = 1
    while engine.has_work():
        engine.step()
        steps += 1
    assert len(got.tokens["keep"][0]) == 40 and len(got.tokens["drop"][0]) == 5
    assert engine.allocator.num_free == 64


def test_outputs_carry_logprobs_stops_and_usage(tm: TextModel) -> None:
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context))
    full = run_all(engine, {"a": (PROMPTS[0], greedy(40))}, tm).text["a"][0]
    stop = full[12:15]
    got = run_all(engine, {"b": (PROMPTS[0], greedy(40, stop=[stop], logprobs=2))}, tm)
    assert got.text["b"][0] == full[: full.index(stop)] and got.finish["b"] == {0: "stop"}
    last = got.events["b"][-1]
    assert last.finished and last.completion_tokens == len(got.tokens["b"][0])
    first = got.events["b"][0].outputs[0].token
    assert first.logprob is not None and len(first.top) == 2 and first.top[0][0] == first.token_id


def test_a_request_beyond_the_whole_cache_is_refused(tm: TextModel) -> None:
    engine = LLMEngine(tm, EngineConfig(block_size=16, num_blocks=4, max_num_batched_tokens=tm.context))
    with pytest.raises(EngineError, match="whole cache holds 64"):
        engine.add_request("x", [1, 2, 3], greedy(100), lambda ev: None)
    with pytest.raises(EngineError, match="runs at most 512"):  # would wait at the head of the queue forever
        engine.add_request("y", [1] * 600, greedy(1), lambda ev: None)


def test_config_defaults_fit_a_full_context() -> None:
    c = EngineConfig.for_model(512, max_num_seqs=64)
    assert c.num_blocks * c.block_size == 32768 and c.max_num_batched_tokens >= 512 + 64
    assert json.dumps(c.__dict__)  # plain numbers, loggable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_engine_on_cuda_follows_cpu(tm: TextModel, quantization: str) -> None:
    """The Triton paths (varlen prefill, paged decode, int8 matmul) drive the engine on a GPU: greedy
    tokens as on the CPU in float32, logits within float32 rounding of the GPU's matmuls."""
    gpu = load(TEXT_DIR, torch.device("cuda"), torch.float32, quantization=quantization)
    cpu = tm if quantization == "none" else load(TEXT_DIR, torch.device("cpu"), torch.float32, quantization="int8")
    requests = {f"r{i}": (p, greedy(24)) for i, p in enumerate(PROMPTS)}
    on_gpu = run_all(LLMEngine(gpu, EngineConfig.for_model(gpu.context)), requests, gpu)
    on_cpu = run_all(LLMEngine(cpu, EngineConfig.for_model(cpu.context)), requests, cpu)
    assert on_gpu.tokens == on_cpu.tokens


def test_stopping_one_sequence_leaves_the_others_and_frees_its_blocks(tm: TextModel) -> None:
    """``abort(rid, index)`` (moderation's stop of one choice): that sequence takes no further step, the
    other choice runs to its end unchanged, and the request finishes with the tokens really generated."""
    params = SamplingParams(max_tokens=30, seed=5, n=2, ignore_eos=True)
    alone = run_all(LLMEngine(tm, EngineConfig.for_model(tm.context)), {"r": ("The json module", params)}, tm)
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context))
    free = engine.allocator.num_free
    got = Collector()
    engine.add_request("r", tm.tokenizer("The json module")["input_ids"], params, got("r"))
    for _ in range(5):
        engine.step()
    engine.abort("r", 0)
    while engine.has_work():
        engine.step()
    assert got.tokens["r"][0] == alone.tokens["r"][0][:5]  # nothing after the stop
    assert got.tokens["r"][1] == alone.tokens["r"][1]  # the other choice as if alone
    last = got.events["r"][-1]
    assert last.finished and last.completion_tokens == 5 + 30 and engine.stopped_sequences == 1
    assert engine.allocator.num_free == free


def test_a_halt_finishes_its_sequence_in_the_step_that_writes_the_term(tm: TextModel) -> None:
    """``SamplingParams.halt`` (output moderation's blocked terms, ``TermHalt``) is checked where the text is
    made: the sequence that writes a term finishes in that very step with ``content_filter``, its last
    token the first to show the term as a whole word; the other choice runs on as if alone; blocks are
    freed."""
    params = SamplingParams(max_tokens=30, seed=5, n=2, ignore_eos=True)
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context))
    alone = run_all(engine, {"r": ("The json module", params)}, tm)
    pieces = [o.text for ev in alone.events["r"] for o in ev.outputs if o.index == 0]
    text = "".join(pieces)
    word = next(m for m in re.finditer(r"[A-Za-z]{3,}", text)
                if m.start() > 3 and m.end() < len(text) and not text[m.end()].isalnum())
    # The first token after which the text holds the word and the character that ends it.
    shown = next(k for k in range(1, len(pieces) + 1) if len("".join(pieces[:k])) > word.end())
    halted = dataclasses.replace(params, halt=TermHalt.for_terms((word.group(),), 48))
    free = engine.allocator.num_free
    got = run_all(engine, {"h": ("The json module", halted)}, tm)
    assert got.finish["h"] == {0: "content_filter", 1: "length"}, (word.group(), text)
    assert got.tokens["h"][0] == alone.tokens["r"][0][:shown]  # not one token more
    assert got.tokens["h"][1] == alone.tokens["r"][1]
    assert got.events["h"][-1].completion_tokens == shown + 30
    assert engine.allocator.num_free == free
    assert pickle.loads(pickle.dumps(halted)).halt is not None  # it travels to the engine process
