"""Plain autoregressive generation for one prompt and its ``n`` samples.

The samples advance together through one KV cache (they share the prompt, so no padding). Each
step yields what every live sample produced: the token, its logprobs if asked, the text it made
readable, and a finish reason once it is done. The caller passes ``should_abort``, checked before
every forward pass, to drop a request whose client went away.

This is the simple reference path; the continuous-batching engine (many requests per forward
pass) replaces it for throughput and must agree with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from genserve.models.text.detokenize import IncrementalDetokenizer, StopMatcher
from genserve.models.text.sampling import SamplingParams, make_generators, sample, top_logprobs


class CausalLM(Protocol):
    def __call__(self, input_ids: torch.Tensor, cache: Any = None) -> torch.Tensor: ...
    def new_cache(self, batch: int, max_len: int) -> Any: ...


@dataclass
class TextModel:
    """A loaded decoder with what serving needs to know about it."""

    model: CausalLM | None  # None where only the tokenizer is loaded (a gateway beside an engine process)
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    eos_ids: set[int]
    context: int
    device: torch.device
    vocab_size: int = 0  # the width of its logits (0: the tokenizer's length), which the watermark keys

    @property
    def logits_width(self) -> int:
        return self.vocab_size or len(self.tokenizer)


@dataclass
class TokenInfo:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleOutput:
    index: int
    text: str
    token: TokenInfo
    finish_reason: str | None = None


@dataclass
class SampleState:
    detok: IncrementalDetokenizer
    stops: StopMatcher
    output_ids: list[int] = field(default_factory=list)
    done: bool = False
    text: str = ""  # the text so far, kept only for ``params.halt``


@torch.inference_mode()
def generate(tm: TextModel, prompt_ids: list[int], params: SamplingParams,
             should_abort: Callable[[], bool] = lambda: False) -> Iterator[list[SampleOutput]]:
    if params.max_tokens is None:
        raise ValueError("generate needs params.max_tokens")
    n, device, max_tokens = params.n, tm.device, params.max_tokens
    cache = tm.model.new_cache(n, len(prompt_ids) + max_tokens)
    gens = make_generators(params, device)  # a CUDA draw needs a CUDA generator
    samples = [SampleState(IncrementalDetokenizer(tm.tokenizer, prompt_ids), StopMatcher(params.stop))
               for _ in range(n)]
    if should_abort():
        return
    logits = tm.model(torch.tensor([prompt_ids] * n, device=device), cache)[:, -1]  # (n, V)
    for step in range(max_tokens):
        outs, next_ids = [], []
        for i, s in enumerate(samples):
            if s.done:
                next_ids.append(next(iter(tm.eos_ids), 0))  # keeps the row aligned; never read
                continue
            row = logits[i]
            banned = tm.eos_ids if len(s.output_ids) < params.min_tokens else None
            tok = sample(row, params, gens[i], prompt_ids, s.output_ids, banned)
            s.output_ids.append(tok)
            info = TokenInfo(tok)
            if params.logprobs is not None:
                info.logprob, info.top = top_logprobs(row, tok, params.logprobs)
            outs.append(advance(s, tok, tm.eos_ids, params, last=step == max_tokens - 1, index=i,
                                 info=info))
            next_ids.append(tok)
        yield outs
        if all(s.done for s in samples) or step == max_tokens - 1 or should_abort():
            return
        logits = tm.model(torch.tensor(next_ids, device=device).view(n, 1), cache)[:, -1]


def advance(s: SampleState, tok: int, eos_ids: set[int], params: SamplingParams, last: bool,
             index: int, info: TokenInfo) -> SampleOutput:
    if tok in eos_ids and not params.ignore_eos:
        s.done = True
        return SampleOutput(index, s.stops.flush(), info, "stop")
    text = s.stops.feed(s.detok.add(tok))
    if s.stops.stopped:
        s.done = True
        return SampleOutput(index, text, info, "stop")
    if params.halt is not None and text:
        s.text += text
        if params.halt(s.text, len(text)):
            s.done = True
            return SampleOutput(index, text, info, "content_filter")
    if last:
        s.done = True
        return SampleOutput(index, text + s.stops.flush(), info, "length")
    return SampleOutput(index, text, info)
