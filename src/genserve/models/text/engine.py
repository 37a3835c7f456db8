"""The continuous-batching text engine: many requests share every forward pass.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022) over a paged KV cache (vLLM's
PagedAttention, Kwon et al., SOSP 2023). Each ``step``:

1. drops aborted requests and frees their blocks at once;
2. gives every running sequence a slot for its next token, preempting the most recently
   admitted sequences (recompute: their blocks are freed and they go back to the head of the
   queue with what they have generated so far) when the cache is full;
3. admits waiting sequences first come, first served, while the token budget, the sequence cap
   and the free blocks allow; a prompt is prefilled whole in the step that admits it;
4. runs one forward pass over all decode tokens and prefill prompts together, samples every
   sequence's next token with its own parameters and generator, and reports what each request
   produced, retiring the finished ones.

The KV memory is allocated once, at ``num_blocks`` blocks of ``block_size`` tokens, and never
grows. Paged blocks rather than one full-context slot per sequence: a slot reserves the whole
context for every sequence, so the same memory holds context / (typical length) times fewer of them.
``benchmarks/kv_cache.py`` measures it (a block as long as the context is a slot): at a
4096-token cache and requests of 124 tokens, paged blocks ran 32.8 sequences per step against 8 and
gave 2.2x the output tokens/s, despite preempting 32 sequences along the way (docs/benchmarks.md).

Requests come in from other threads (``add_request``, ``abort``); ``step`` runs on one thread.
``models.text.generate`` is the one-request reference loop that this engine must agree with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch

from genserve.models.llama.model import PagedBatch
from genserve.models.text.detokenize import IncrementalDetokenizer, StopMatcher, fast_decoder
from genserve.models.text.generate import SampleOutput, SampleState, TextModel, TokenInfo, advance
from genserve.models.text.sampling import SampleRow, SamplingParams, make_generators, sample_batch, top_logprobs

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 1024  # the KV budget: num_blocks * block_size tokens over all sequences
    max_num_seqs: int = 64  # sequences in one step
    max_num_batched_tokens: int = 2048  # decode tokens + prefill tokens in one step
    # CPU: intra-op threads for steps with at least ``wide_step_tokens`` prefill tokens (others use
    # torch's current setting). Decode steps are too small to gain from a second thread that the
    # HTTP side needs; a burst of prompts is not. 0: never change the thread count.
    wide_step_threads: int = 0
    wide_step_tokens: int = 256

    @classmethod
    def for_model(cls, context: int, kv_cache_tokens: int | None = None, block_size: int = 16,
                  max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                  wide_step_threads: int = 0) -> EngineConfig:
        """A config whose token budget fits at least one full-context prompt; by default a KV budget
        of ``max_num_seqs`` full contexts, capped at 32k tokens."""
        tokens = kv_cache_tokens or min(max_num_seqs * context, 32768)
        return cls(block_size=block_size, num_blocks=-(-tokens // block_size), max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max(max_num_batched_tokens or 2048, context + max_num_seqs),
                   wide_step_threads=wide_step_threads)


class EngineError(ValueError):
    """A request this engine can never run (for example, longer than its whole KV budget)."""


class EngineShutdown(RuntimeError):
    """The error of requests failed by ``fail_waiting``: the server is shutting down."""


@dataclass
class RequestEvent:
    """What one step produced for one request, delivered to the request's callback."""

    outputs: list[SampleOutput]
    finished: bool = False
    aborted: bool = False
    queue_time: float | None = None  # on the request's first event
    prompt_tokens: int = 0
    completion_tokens: int = 0  # on the finishing event
    error: BaseException | None = None  # the request failed (it is finished)


@dataclass
class StepStats:
    running: int = 0  # requests with a sequence in the batch
    num_seqs: int = 0
    num_tokens: int = 0  # prefill + decode tokens in the forward pass
    num_preemptions: int = 0
    kv_usage: float = 0.0


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[RequestEvent], None]
    arrival: float = field(default_factory=time.perf_counter)
    seqs: list[_Sequence] = field(default_factory=list)
    first_scheduled: float | None = None
    queue_reported: bool = False

    @property
    def done(self) -> bool:
        return all(s.state.done for s in self.seqs)


@dataclass(eq=False)
class _Sequence:
    request: _Request
    index: int
    state: SampleState
    generator: torch.Generator
    blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.state.output_ids)

    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.state.output_ids


class BlockAllocator:
    """Free list over the cache's block ids."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()


class LLMEngine:
    def __init__(self, tm: TextModel, config: EngineConfig) -> None:
        if config.max_num_batched_tokens < tm.context:
            raise ValueError(f"max_num_batched_tokens={config.max_num_batched_tokens} must hold a full context "
                             f"({tm.context} tokens): prompts are prefilled in one step")
        self.tm, self.config = tm, config
        self._decode = fast_decoder(tm.tokenizer)
        self.kv_caches = tm.model.new_paged_cache(config.num_blocks, config.block_size)
        self.allocator = BlockAllocator(config.num_blocks)
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self._inbox: list[_Request] = []
        self._aborts: set[tuple[str, int | None]] = set()  # (request, sequence or None for all)
        self.stopped_sequences = 0  # sequences stopped alone (abort with an index), for tests and metrics
        self._fail_waiting: BaseException | None = None
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # guards the inbox: requests may come from other threads
        # The last step's logits (S, V) and whose they were as (request_id, index): for tests.
        self.last_logits: torch.Tensor | None = None
        self.last_scheduled: list[tuple[str, int]] = []

    def kv_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)

    # other threads ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    callback: Callable[[RequestEvent], None]) -> None:
        """Queues a request; ``callback`` gets its events on the engine's thread."""
        if params.max_tokens is None:
            raise ValueError("the engine needs params.max_tokens")
        longest = len(prompt_ids) + params.max_tokens
        if longest > min(self.tm.context, self.config.max_num_batched_tokens):
            # A recomputed sequence is prefilled whole, so it must fit one step's budget and the context.
            raise EngineError(f"this request needs up to {longest} tokens per sequence; the engine runs at most "
                              f"{min(self.tm.context, self.config.max_num_batched_tokens)}")
        need = self._blocks_for(longest)
        if need > self.config.num_blocks:
            raise EngineError(f"this request needs up to {len(prompt_ids) + params.max_tokens} tokens of KV cache "
                              f"per sequence; the model's whole cache holds "
                              f"{self.config.num_blocks * self.config.block_size}")
        req = _Request(request_id, list(prompt_ids), params, callback)
        gens = make_generators(params, self.tm.device)
        for i in range(params.n):
            state = SampleState(IncrementalDetokenizer(self.tm.tokenizer, prompt_ids, self._decode),
                                StopMatcher(params.stop))
            req.seqs.append(_Sequence(req, i, state, gens[i]))
        with self._lock:
            self._inbox.append(req)

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Removes the request (or only its sequence ``index``) at the next step; the KV blocks are free
        from then on. A request whose last running sequence is stopped finishes at that step."""
        with self._lock:
            self._aborts.add((request_id, index))

    def fail_waiting(self, error: BaseException) -> None:
        """Fails, at the next step, every request that has not started (shutdown: running ones finish)."""
        with self._lock:
            self._fail_waiting = error

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self._fail_waiting or self.waiting or self.running)

    # the engine's thread ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepStats:
        self._take_inbox()
        stats = StepStats()
        decodes, prefills = self._schedule(stats)
        seqs = decodes + prefills
        prefill_tokens = sum(s.num_tokens for s in prefills)
        if seqs:
            wide = self.config.wide_step_threads and prefill_tokens >= self.config.wide_step_tokens
            narrow = torch.get_num_threads()
            if wide:
                torch.set_num_threads(self.config.wide_step_threads)
            try:
                logits = self.tm.model.forward_paged(self._prepare(decodes, prefills))  # (S, V)
            finally:
                if wide:
                    torch.set_num_threads(narrow)
            self.last_logits, self.last_scheduled = logits, [(s.request.request_id, s.index) for s in seqs]
            self._emit(seqs, logits)
        stats.num_seqs = len(seqs)
        stats.num_tokens = len(decodes) + prefill_tokens
        stats.running = len({id(s.request) for s in self.running})
        stats.kv_usage = 1.0 - self.allocator.num_free / self.config.num_blocks
        return stats

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
            fail, self._fail_waiting = self._fail_waiting, None
        for req in new:
            self._requests[req.request_id] = req
            self.waiting.extend(req.seqs)
        for rid, index in aborts:
            if (req := self._requests.get(rid)) is None:
                continue
            if index is None:
                self._drop(req, RequestEvent([], finished=True, aborted=True))
            elif 0 <= index < len(req.seqs):
                self._stop_sequence(req.seqs[index])
        if fail is not None:
            for req in [r for r in self._requests.values() if r.first_scheduled is None]:
                self._drop(req, RequestEvent([], finished=True, error=fail))

    def _stop_sequence(self, seq: _Sequence) -> None:
        """One sequence of a request stops where it is (its caller stopped wanting it); the others go on."""
        if seq.state.done:
            return
        seq.state.done = True
        self.stopped_sequences += 1
        self.allocator.free(seq.blocks)
        seq.blocks = []
        self.running = [s for s in self.running if s is not seq]
        self.waiting = deque(s for s in self.waiting if s is not seq)
        req = seq.request
        if req.done:
            self._requests.pop(req.request_id, None)
            req.callback(RequestEvent([], finished=True, prompt_tokens=len(req.prompt_ids),
                                      completion_tokens=sum(len(s.state.output_ids) for s in req.seqs)))

    def fail_all(self, error: BaseException) -> None:
        """After a failed step (on the engine's thread): every request gets ``error``; the engine is empty."""
        for req in list(self._requests.values()):
            self._drop(req, RequestEvent([], finished=True, error=error))

    def _drop(self, req: _Request, event: RequestEvent) -> None:
        """Takes a request out of the engine, frees its blocks at once and tells its caller."""
        self._requests.pop(req.request_id, None)
        for s in req.seqs:
            self.allocator.free(s.blocks)
        self.running = [s for s in self.running if s.request is not req]
        self.waiting = deque(s for s in self.waiting if s.request is not req)
        event.prompt_tokens = len(req.prompt_ids)
        event.completion_tokens = sum(len(s.state.output_ids) for s in req.seqs)
        req.callback(event)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _schedule(self, stats: StepStats) -> tuple[list[_Sequence], list[_Sequence]]:
        # Decodes: each running sequence needs room for the token it is about to feed.
        queue, decodes = list(self.running), []
        while queue:
            seq = queue.pop(0)
            while self._blocks_for(seq.num_tokens) > len(seq.blocks) and not self.allocator.num_free:
                victim = queue.pop() if queue else seq  # the latest admitted goes first
                self._preempt(victim)
                stats.num_preemptions += 1
                if victim is seq:
                    break
            else:
                if self._blocks_for(seq.num_tokens) > len(seq.blocks):
                    seq.blocks += self.allocator.allocate(1)
                decodes.append(seq)
        # Prefills: first come, first served, under the token budget; none while preempting.
        budget, prefills = self.config.max_num_batched_tokens - len(decodes), []
        while self.waiting and not stats.num_preemptions and len(decodes) + len(prefills) < self.config.max_num_seqs:
            seq = self.waiting[0]
            need = self._blocks_for(seq.num_tokens)
            if seq.num_tokens > budget or need > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.blocks = self.allocator.allocate(need)
            budget -= seq.num_tokens
            prefills.append(seq)
            if seq.request.first_scheduled is None:
                seq.request.first_scheduled = time.perf_counter()
        self.running = decodes + prefills
        return decodes, prefills

    def _preempt(self, seq: _Sequence) -> None:
        self.allocator.free(seq.blocks)
        self.waiting.appendleft(seq)

    def _prepare(self, decodes: list[_Sequence], prefills: list[_Sequence]) -> PagedBatch:
        bs = self.config.block_size
        ids, pos, slots = [], [], []
        for s in decodes:
            p = s.num_tokens - 1
            ids.append(s.tokens()[-1])
            pos.append(p)
            slots.append(s.blocks[p // bs] * bs + p % bs)
        cu, last = [0], [*range(len(decodes))]
        for s in prefills:
            n = s.num_tokens
            ids += s.tokens()
            pos += range(n)
            slots += [s.blocks[p // bs] * bs + p % bs for p in range(n)]
            cu.append(cu[-1] + n)
            last.append(len(decodes) + cu[-1] - 1)
        width = max((len(s.blocks) for s in decodes), default=0)
        dev = self.tm.device

        def t(x: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        tables = [s.blocks + [0] * (width - len(s.blocks)) for s in decodes]  # padding ids are never read
        return PagedBatch(
            input_ids=t(ids), positions=t(pos), slot_mapping=t(slots), num_decode=len(decodes),
            block_tables=t(tables, torch.int32).view(len(decodes), width),
            context_lens=t([s.num_tokens for s in decodes], torch.int32),
            cu_seqlens=t(cu, torch.int32), max_seqlen=max((b - a for a, b in pairwise(cu)), default=0),
            logits_index=t(last), kv_caches=self.kv_caches)

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        eos = self.tm.eos_ids
        rows = [SampleRow(s.request.params, s.generator, s.request.prompt_ids, s.state.output_ids,
                          eos if len(s.state.output_ids) < s.request.params.min_tokens else None) for s in seqs]
        tokens = sample_batch(logits, rows)
        events: dict[int, tuple[_Request, list[SampleOutput]]] = {}
        for i, (s, tok) in enumerate(zip(seqs, tokens, strict=True)):
            params, st = s.request.params, s.state
            st.output_ids.append(tok)
            info = TokenInfo(tok)
            if params.logprobs is not None:
                info.logprob, info.top = top_logprobs(logits[i], tok, params.logprobs)
            last = len(st.output_ids) >= (params.max_tokens or 0)
            out = advance(st, tok, eos, params, last=last, index=s.index, info=info)
            events.setdefault(id(s.request), (s.request, []))[1].append(out)
            if st.done:
                self.allocator.free(s.blocks)
        self.running = [s for s in self.running if not s.state.done]
        for req, outs in events.values():
            ev = RequestEvent(outs, prompt_tokens=len(req.prompt_ids))
            if not req.queue_reported:
                ev.queue_time, req.queue_reported = (req.first_scheduled or req.arrival) - req.arrival, True
            if req.done:
                ev.finished = True
                ev.completion_tokens = sum(len(s.state.output_ids) for s in req.seqs)
                self._requests.pop(req.request_id, None)
            req.callback(ev)
