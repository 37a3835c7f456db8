"""Per-request sampling: the parameters, the logits processors, and the draw.

The processors run in the order vLLM and Hugging Face use: logit bias, repetition penalty (over
prompt and output, CTRL paper's divide/multiply rule), presence and frequency penalties (over the
output, OpenAI's definition), the watermark's green-list bias (``watermark.py``), then
temperature, top-k, top-p and min-p. Reported logprobs are
those of the model's raw distribution, before any of this, as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from genserve.models.seeding import sample_seed, seed_or_random
from genserve.models.text.watermark import Watermark, green_lists


class OutputHalt(Protocol):
    """A check of a sequence's text (all of it so far) after every token that adds text, where the text is
    made: True finishes the sequence in that step with ``finish_reason`` ``"content_filter"``. Output
    moderation's blocked terms (``app.moderation.text.TermHalt``): the engine stops a sequence in the step
    that writes one, as it does at a stop string, instead of when the gateway's abort arrives some steps
    later. Picklable: it travels to the engine's process with the params."""

    def __call__(self, text: str, added: int) -> bool: ...  # ``added``: how many of its last characters are new


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
    watermark: Watermark | None = None  # applied to drawn tokens only: greedy stays greedy
    halt: OutputHalt | None = None  # checked after every token; True finishes the sequence (content_filter)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generators(params: SamplingParams, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, so sample ``i`` draws the same numbers whatever else runs
    (``models.seeding``: sample ``i`` of seed ``s`` draws from ``sample_seed(s, i)``)."""
    base = seed_or_random(params.seed)
    return [torch.Generator(device=device).manual_seed(sample_seed(base, i)) for i in range(params.n)]


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
    return filter_batch(logits[None], [params])[0]


def filter_batch(logits: torch.Tensor, params: list[SamplingParams], prefix: int = 256) -> torch.Tensor:
    """``filter_logits`` for a batch (B, V) whose rows each have their own parameters.

    Each filter becomes a per-row threshold on the tempered logits: top-k keeps what reaches the
    k-th largest, top-p what reaches the smallest value of the shortest prefix whose renormalised
    mass reaches p (the first token always stays), min-p what has at least ``min_p`` times the top
    probability. The sorted prefix comes from ``topk`` over the first ``prefix`` entries, which is
    several times cheaper than a full sort on CPU; a row whose top-p mass is not reached there is
    redone with the whole vocabulary.
    """
    B, V = logits.shape
    dev, dt = logits.device, logits.dtype
    x = logits / torch.tensor([p.temperature for p in params], device=dev, dtype=dt)[:, None]  # (B, V)
    ks = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=dt)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=dt)
    use_k, use_p = bool((ks < V).any()), bool((top_p < 1.0).any())
    thr = torch.full((B,), float("-inf"), device=dev, dtype=dt)
    if use_k or use_p:
        width = V if prefix >= V else min(V, max(int(ks[ks < V].max()) if use_k else 0, prefix if use_p else 0))
        vals = torch.topk(x, width, dim=-1).values  # (B, width), descending
        rank = torch.arange(width, device=dev)
        vals = vals.masked_fill(rank[None] >= ks[:, None], float("-inf"))  # top-k
        # Top-p renormalises over what top-k left: that is the prefix when top-k is on, else all of V.
        lse = torch.where(ks < V, vals.logsumexp(-1), x.logsumexp(-1))
        probs = (vals - lse[:, None]).exp()
        before = probs.cumsum(-1) - probs  # mass strictly ahead of each entry
        # The first token stays even when top_p is too small for float32 to hold (it rounds to 0).
        keep = ((before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (rank[None] == 0)) & (vals > float("-inf"))
        if width < V and bool(((top_p < 1.0) & (ks == V) & keep.all(-1)).any()):
            return filter_batch(logits, params, prefix=V)  # some row's top-p cut lies beyond the prefix
        thr = vals.masked_fill(~keep, float("inf")).min(-1).values  # (B,): smallest kept value
        # A row with neither filter keeps everything, whatever width its neighbours needed.
        thr = torch.where((ks < V) | (top_p < 1.0), thr, torch.full_like(thr, float("-inf")))
    top = x.max(-1).values
    thr = torch.maximum(thr, torch.where(min_p > 0, top + min_p.log(), torch.full_like(thr, float("-inf"))))
    if not (use_k or use_p or bool((min_p > 0).any())):
        return x
    return x.masked_fill(x < thr[:, None], float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           prompt_ids: list[int], output_ids: list[int], banned: set[int] | None = None) -> int:
    """Draws the next token for one sequence from its row of logits (V,)."""
    return sample_batch(logits[None], [SampleRow(params, generator, prompt_ids, output_ids, banned)])[0]


@dataclass
class SampleRow:
    """What the sampler needs to know about one sequence of a batch."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int]
    banned: set[int] | None = None


def sample_batch(logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
    """Draws the next token of every sequence in a batch from its row of ``logits`` (B, V).

    Penalties and bans apply per row; the filters run batched. The draw inverts each row's CDF at
    one uniform number from the row's own generator, so a seeded sequence draws the same tokens
    whatever else is in the batch.
    """
    logits = logits.float()
    own = list(logits.unbind(0))
    adjusted = [apply_penalties(own[i], r.params, r.prompt_ids, r.output_ids) for i, r in enumerate(rows)]
    for i, r in enumerate(rows):
        if r.banned:  # out of place: the row may still be the model's, whose logprobs are reported
            adjusted[i] = adjusted[i].index_fill(0, torch.tensor(sorted(r.banned), device=logits.device),
                                                 float("-inf"))
    x = torch.stack(adjusted) if any(a is not o for a, o in zip(adjusted, own, strict=True)) else logits
    tokens = x.argmax(-1).tolist()
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        xd = _watermarked(x[drawn], [rows[i] for i in drawn])
        cdf = filter_batch(xd, [rows[i].params for i in drawn]).softmax(-1).cumsum(-1)  # (b, V)
        # u in (0, 1], so a token of zero probability (a flat stretch of the CDF) is never hit.
        u = 1.0 - torch.cat([torch.rand(1, generator=rows[i].generator, device=cdf.device) for i in drawn])
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(cdf.shape[-1] - 1)  # (b, 1)
        for i, tok in zip(drawn, picks[:, 0].tolist(), strict=True):
            tokens[i] = tok
    return tokens
def _watermarked(x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """``x`` (b, V) with each watermarked row's green tokens raised, keyed by its previous token."""
    marked: dict[Watermark, list[int]] = {}
    for i, r in enumerate(rows):
        if r.params.watermark is not None:
            marked.setdefault(r.params.watermark, []).append(i)
    if not marked:
        return x
    prevs = [(r.output_ids or r.prompt_ids or [0])[-1] for r in rows]
    if [len(idx) for idx in marked.values()] == [len(rows)]:  # every row one model's: one add, no copy
        (mark, _), = marked.items()
        return green_lists(mark, x.shape[-1]).bias(x, prevs)
    x = x.clone()
    for mark, idx in marked.items():
        x[idx] = green_lists(mark, x.shape[-1]).bias(x[idx], [prevs[i] for i in idx])
    return x


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the ``k`` most likely tokens with theirs, from raw logits."""
    logp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(logp, k) if k > 0 else None
    alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return float(logp[token]), alts
