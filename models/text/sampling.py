"""Per-request sampling: the parameters, the logits processors, and the draw.

The processors run in the order vLLM and Hugging Face use: logit bias, repetition penalty (over
prompt and output, CTRL paper's divide/multiply rule), presence and frequency penalties (over the
output, OpenAI's definition), then temperature, top-k, top-p and min-p. Reported logprobs are
those of the model's raw distribution, before any of this, as vLLM reports them by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: as many as the context leaves
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's plus k alternatives
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generators(params: SamplingParams, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, so sample ``i`` draws the same numbers whatever else runs."""
    base = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    gens = []
    for i in range(params.n):
        g = torch.Generator(device=device)
        g.manual_seed((base + 0x9E3779B97F4A7C15 * i) & 0x7FFF_FFFF_FFFF_FFFF)
        gens.append(g)
    return gens


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """Bias and penalties on one row of logits (V,): a new tensor, or ``logits`` itself when none apply."""
    if not (params.logit_bias or params.repetition_penalty != 1.0 or params.presence_penalty
            or params.frequency_penalty):
        return logits
    logits = logits.clone()
    for tok, bias in params.logit_bias.items():
        if 0 <= tok < logits.shape[-1]:
            logits[tok] += bias
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty,
                                   vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device),
                                minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p on one row (V,); removed entries become -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           prompt_ids: list[int], output_ids: list[int], banned: set[int] | None = None) -> int:
    """Draws the next token for one sequence from its row of logits (V,)."""
    logits = apply_penalties(logits.float(), params, prompt_ids, output_ids)
    if banned:  # out of place: ``logits`` may still be the model's row, whose logprobs are reported
        logits = logits.index_fill(0, torch.tensor(sorted(banned), device=logits.device), float("-inf"))
    if params.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the ``k`` most likely tokens with theirs, from raw logits."""
    logp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(logp, k) if k > 0 else None
    alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return float(logp[token]), alts
