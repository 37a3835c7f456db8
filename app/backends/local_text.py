"""In-process text generation on the continuous-batching engine (``models.text.engine``).

Requests are tokenized on the event loop's side (one worker thread, so the tokenizer never sees
concurrent calls), then handed to the engine, whose thread steps the whole batch and posts each
request's events back to its asyncio queue. A request whose client leaves is aborted: it drops out
of the batch at the next step and its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from app.backends.base import STALL_SECONDS, Backend, Delta, TextRequest, TokenLogprob, Usage, check_token_ids
from app.errors import InvalidRequestError, RateLimitError, UnavailableError
from app.metrics import Metrics
from app.registry import ModelEntry
from models.families import load_family
from models.text.engine import EngineConfig, EngineError, LLMEngine, RequestEvent, StepStats
from models.text.generate import SampleOutput, TextModel

log = logging.getLogger(__name__)


class LocalTextBackend(Backend):
    meters_tokens = True  # per step, so aborted requests count what they really generated

    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.metrics = metrics
        self.tm: TextModel | None = None
        self.engine: LLMEngine | None = None
        self._waiting = 0  # admitted, not yet started: tokenizing, or queued in the engine
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._step_started: float | None = None
        # Off the event loop: a prompt at the body cap takes most of a second to tokenize. One
        # thread, so the tokenizer never sees concurrent calls.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{entry.id}")
        self._chars_per_token = 0  # the most characters one token decodes to (+1 for a joining space)
        self._draining = False
        self._ids = itertools.count()  # engine ids: one HTTP request may send several prompts
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, RequestEvent]] = []  # engine thread

    # lifecycle --------------------------------------------------------------------------------
    def setup(self) -> None:
        e = self.entry
        self.tm = load_family(e.family or "", e.resolved_source or e.source or "", e.device, e.dtype,
                              quantization=e.quantization)
        tok = self.tm.tokenizer
        self._chars_per_token = 1 + max(map(len, tok.batch_decode([[i] for i in range(len(tok))])))
        config = EngineConfig.for_model(self.tm.context, e.kv_cache_tokens, e.kv_block_size, e.max_batch_size,
                                        e.max_num_batched_tokens)
        self.engine = LLMEngine(self.tm, config)
        log.info("%s: KV cache of %d blocks x %d tokens (%.1f MiB), %d sequences and %d tokens per step",
                 e.id, config.num_blocks, config.block_size, self.engine.kv_cache_bytes() / 2**20,
                 config.max_num_seqs, config.max_num_batched_tokens)
        self._thread = threading.Thread(target=self._loop, name=f"engine-{e.id}", daemon=True)
        self._thread.start()
        self.loaded = True

    def ready(self) -> bool:
        if not self.loaded or self._thread is None or not self._thread.is_alive():
            return False
        started = self._step_started
        return started is None or time.monotonic() - started < STALL_SECONDS

    def drain(self) -> None:
        self._draining = True
        if self.engine is not None:
            self.engine.fail_waiting(UnavailableError("The server is shutting down.", headers={"Retry-After": "5"}))

    async def close(self) -> None:
        """Fails what is still queued and stops the engine after its current step."""
        self.drain()
        self._stopped = True
        if self.engine is not None:
            self.engine.wake()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        return {"context_length": self.tm.context if self.tm else None}

    # request side (event loop) ----------------------------------------------------------------
    def tokenize(self, request: TextRequest) -> list[int]:
        tm = self.tm
        assert tm is not None
        self._check_chars(request)
        if request.messages is not None:
            ids = tm.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
            param = "messages"
        elif isinstance(request.prompt, str):
            ids, param = tm.tokenizer(request.prompt)["input_ids"], "prompt"
        else:
            ids, param = list(request.prompt or []), "prompt"
            check_token_ids([ids], len(tm.tokenizer), "prompt")
        check_token_ids([list(request.params.logit_bias)], len(tm.tokenizer), "logit_bias")
        if not ids:
            raise InvalidRequestError("The prompt is empty.", param=param)
        params = request.params
        if params.max_tokens is None:
            params.max_tokens = max(tm.context - len(ids), 1)
            if self.entry.limits.max_tokens is not None:
                params.max_tokens = min(params.max_tokens, self.entry.limits.max_tokens)
        self._check_length(len(ids), params.max_tokens, param)
        return ids

    def _check_chars(self, request: TextRequest) -> None:
        """A text of N characters is at least N / chars_per_token tokens: one that cannot fit the
        context whatever its tokenization is refused before paying for it."""
        if request.messages is not None:
            chars, param = sum(len(m["content"]) for m in request.messages), "messages"
        elif isinstance(request.prompt, str):
            chars, param = len(request.prompt), "prompt"
        else:
            return
        ctx = self.tm.context if self.tm else 0
        if chars > ctx * self._chars_per_token:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx} tokens, and your {param} of {chars} "
                f"characters is longer than that however it is tokenized.", param=param,
                code="context_length_exceeded")

    def _check_length(self, prompt_len: int, max_tokens: int, param: str) -> None:
        ctx = self.tm.context if self.tm else 0
        if prompt_len >= ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx} tokens, and your {param} has "
                f"{prompt_len} tokens; leave room for at least one generated token.", param=param,
                code="context_length_exceeded")
        if prompt_len + max_tokens > ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} for the "
                f"completion). Reduce max_tokens to at most {ctx - prompt_len}.", param="max_tokens",
                code="context_length_exceeded")

    async def generate(self, request: TextRequest) -> AsyncIterator[Delta | Usage]:
        # The queue slot is taken before tokenizing, so max_waiting bounds the tokenizer's backlog.
        self._count_waiting(+1, limit=self.entry.max_waiting)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[RequestEvent] = asyncio.Queue()
        added, rid = False, f"{request.request_id}-{next(self._ids)}"
        try:
            prompt_ids = await loop.run_in_executor(self._tokenizer_pool, self.tokenize, request)
            if self._draining or self.engine is None:
                raise UnavailableError("The server is shutting down.", headers={"Retry-After": "5"})
            self.engine.add_request(rid, prompt_ids, request.params,
                                    self._on_event(loop, out, len(prompt_ids)))
            added = True
        except EngineError as exc:
            raise InvalidRequestError(str(exc), param="max_tokens", code="context_length_exceeded") from exc
        finally:
            if not added:
                self._count_waiting(-1)
        finished = False
        try:
            while not finished:
                # Whatever piled up while this consumer was busy goes out as one delta per choice
                # (as vLLM's output collector merges): under load, fewer, larger chunks.
                events = [await out.get()]
                while not out.empty():
                    events.append(out.get_nowait())
                deltas: dict[int, Delta] = {}
                for ev in events:
                    if ev.error is not None:
                        raise ev.error
                    for o in ev.outputs:
                        d = self._delta(o, request.params.logprobs)
                        if (prev := deltas.get(d.index)) is None:
                            deltas[d.index] = d
                        else:
                            prev.text += d.text
                            prev.finish_reason = d.finish_reason
                            if prev.logprobs is not None:
                                prev.logprobs += d.logprobs or []
                    finished = finished or ev.finished
                for d in deltas.values():
                    yield d
                if finished:
                    yield Usage(events[-1].prompt_tokens, events[-1].completion_tokens)
        finally:
            if not finished:  # the client left, or the deadline passed: out of the batch at the next step
                self.engine.abort(rid)

    def _count_waiting(self, delta: int, limit: int | None = None) -> None:
        with self._lock:
            if limit is not None and self._waiting >= limit:
                raise RateLimitError(f"Too many requests waiting for model '{self.entry.id}' ({self._waiting} "
                                     f"queued, limit {limit}); retry shortly.", headers={"Retry-After": "1"})
            self._waiting += delta
            self.metrics.num_requests_waiting.labels(self.entry.id).set(self._waiting)

    # engine thread ----------------------------------------------------------------------------
    def _on_event(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue,
                  prompt_tokens: int) -> Callable[[RequestEvent], None]:
        """The request's callback on the engine thread: meters the event, then posts it to the loop."""
        m, mid = self.metrics, self.entry.id
        started = False

        def on_event(ev: RequestEvent) -> None:
            nonlocal started
            if not started:
                started = True
                self._count_waiting(-1)
                if ev.queue_time is not None:
                    m.request_queue_time.labels(mid).observe(ev.queue_time)
                    m.prompt_tokens.labels(mid).inc(prompt_tokens)
            m.generation_tokens.labels(mid).inc(len(ev.outputs))
            if ev.aborted:
                m.request_success.labels(mid, "abort").inc()
            for o in ev.outputs:
                if o.finish_reason:
                    m.request_success.labels(mid, o.finish_reason).inc()
            self._outbox.append((loop, out, ev))

        return on_event

    def _flush(self) -> None:
        """Posts the step's events: one wake-up of each event loop per step, not one per request."""
        batch, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestEvent]]] = {}
        for loop, out, ev in batch:
            by_loop.setdefault(loop, []).append((out, ev))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _loop(self) -> None:
        engine = self.engine
        assert engine is not None
        while not self._stopped:
            if not engine.wait_for_work(timeout=1.0):
                continue
            self._step_started = time.monotonic()
            try:
                stats = engine.step()
            except Exception as exc:  # reaches the clients as a 500; the engine starts over empty
                log.exception("engine step failed for %s", self.entry.id)
                engine.fail_all(exc)
                continue
            finally:
                self._step_started = None
                self._flush()
            self._record(stats)

    def _record(self, stats: StepStats) -> None:
        m, mid = self.metrics, self.entry.id
        m.num_requests_running.labels(mid).set(stats.running)
        m.kv_cache_usage.labels(mid).set(stats.kv_usage)
        if stats.num_preemptions:
            m.num_preemptions.labels(mid).inc(stats.num_preemptions)
        if stats.num_seqs:
            m.batch_size.labels(mid).observe(stats.num_seqs)
            m.iteration_tokens.labels(mid).observe(stats.num_tokens)

    def _delta(self, o: SampleOutput, logprobs: int | None) -> Delta:
        lp = None
        if logprobs is not None and self.tm is not None:
            dec = self.tm.tokenizer.decode
            lp = [TokenLogprob(dec([o.token.token_id]), o.token.logprob or 0.0,
                               [(dec([t]), v) for t, v in o.token.top])]
        return Delta(o.index, o.text, lp, o.finish_reason)


def _put_all(items: list[tuple[asyncio.Queue, RequestEvent]]) -> None:
    for out, ev in items:
        out.put_nowait(ev)
