"""Local text generation on the continuous-batching engine (``models.text.engine``).

The engine runs in a child process (``engine_process``); this side tokenizes (one worker thread,
so the tokenizer never sees concurrent calls), checks limits, sends requests over, and posts each
step's events to the requests' asyncio queues, one wake-up of the event loop per step. A request
whose client leaves is aborted: it drops out of the batch at the child's next step and its KV
blocks are freed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from genserve.app.backends.base import STALL_SECONDS, Backend, Delta, ModelFacts, TokenLogprob, Usage, check_token_ids
from genserve.app.backends.engine_process import EngineClient, EngineSpec
from genserve.app.errors import InvalidRequestError, RateLimitError, UnavailableError
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry
from genserve.models.common.loading import load_family_info
from genserve.models.params import TextParams
from genserve.models.text.engine import EngineConfig, EngineError, EngineShutdown, RequestEvent, StepStats
from genserve.models.text.generate import SampleOutput, TextModel

log = logging.getLogger(__name__)
RESTART_BACKOFF_RESET_S = 60.0  # an engine that served this long before dying was not crash-looping


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    meter: Callable[[RequestEvent], None]


def restarts_after_exit(restarts: int, lived_s: float) -> int:
    """The restart back-off's count once an engine that ran ``lived_s`` seconds has died: kept while
    engines die soon after starting (a crash loop), back to 0 after one that served a good while."""
    return 0 if lived_s > RESTART_BACKOFF_RESET_S else restarts


class LocalTextBackend(Backend):
    meters_tokens = True  # per step, so aborted requests count what they really generated

    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.metrics = metrics
        self.tm: TextModel | None = None  # tokenizer and limits; the weights live in the engine process
        self.engine: EngineClient | None = None
        self.config: EngineConfig | None = None
        self._waiting = 0  # admitted, not yet started: tokenizing, or queued in the engine
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # requests sent to the engine and not finished
        self._engine_exited = False
        self._restarts = 0  # engine processes started after the first one died
        # Off the event loop: a prompt at the body cap takes most of a second to tokenize. One
        # thread, so the tokenizer never sees concurrent calls.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{entry.id}")
        self._chars_per_token = 0  # the most characters one token decodes to (+1 for a joining space)
        self._draining = False
        self._ids = itertools.count()  # engine ids: one HTTP request may send several prompts
        self._engine_ids: dict[str, str] = {}  # TextParams.request_id → engine id, while it runs

    # lifecycle --------------------------------------------------------------------------------
    def setup(self) -> None:
        e = self.entry
        source = str(e.resolved_source or e.source or "")
        self.tm = load_family_info(e.family or "", source, e.device)
        tok = self.tm.tokenizer
        self._chars_per_token = 1 + max(map(len, tok.batch_decode([[i] for i in range(len(tok))])))
        # One core stays with the HTTP side unless the registry says otherwise; steps that prefill a
        # burst of prompts borrow it (the HTTP side is waiting for their first tokens then).
        cores = os.cpu_count() or 2
        threads = e.threads or max(1, cores - 1)
        spec = EngineSpec(e.family or "", source, e.device, e.dtype, e.quantization, threads,
                          cores if threads < cores else 0, e.kv_cache_tokens, e.kv_block_size, e.max_batch_size,
                          e.max_num_batched_tokens)
        self._spec = spec
        self.engine = EngineClient(spec, e.id, self._on_step)
        self.engine.start()
        c = self.config = self.engine.info["config"]
        log.info("%s: engine process %d, threads=%d; KV cache of %d blocks x %d tokens (%.1f MiB), "
                 "%d sequences and %d tokens per step", e.id, self.engine.process.pid, threads, c.num_blocks,
                 c.block_size, self.engine.info["kv_cache_bytes"] / 2**20, c.max_num_seqs, c.max_num_batched_tokens)
        m = self.metrics  # series exist from the start, at zero, as Prometheus expects of counters
        m.num_preemptions.labels(e.id)
        m.kv_cache_usage.labels(e.id).set(0)
        self.loaded = True

    def ready(self) -> bool:
        if not self.loaded or self.engine is None or self._engine_exited or not self.engine.alive():
            return False
        return not self._pending or time.monotonic() - self.engine.last_message < STALL_SECONDS

    def drain(self) -> None:
        self._draining = True
        if self.engine is not None:
            self.engine.fail_waiting()

    async def close(self) -> None:
        """Stops the engine process after its current step; requests still in it get a 503."""
        self.drain()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.stop()
            await asyncio.to_thread(self.engine.join, 10.0)

    def describe(self) -> ModelFacts:
        return ModelFacts(context_length=self.tm.context if self.tm else None)

    # request side (event loop) ----------------------------------------------------------------
    async def token_ids(self, text: str) -> tuple[list[int], int] | None:
        """``text`` as this model's tokens (no special ones, on the tokenizer's own thread) and its logits' width."""
        tm = self.tm
        if tm is None:
            return None
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenizer_pool,
                                         lambda: list(tm.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return ids, tm.logits_width

    def tokenize(self, request: TextParams) -> list[int]:
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
            params.max_tokens = max(self.max_len() - len(ids), 1)
            if self.entry.limits.max_tokens is not None:
                params.max_tokens = min(params.max_tokens, self.entry.limits.max_tokens)
        self._check_length(len(ids), params.max_tokens, param)
        return ids

    async def decode(self, ids: list[int]) -> str | None:
        """Token ids as text (what input moderation reads of a token-id prompt)."""
        assert self.tm is not None
        check_token_ids([ids], len(self.tm.tokenizer), "prompt")
        return self.tm.tokenizer.decode(ids)

    def max_len(self) -> int:
        """Tokens one sequence may reach: the context, or less when the whole KV cache is smaller."""
        ctx = self.tm.context if self.tm else 0
        return min(ctx, self.config.num_blocks * self.config.block_size) if self.config else ctx

    def _check_chars(self, request: TextParams) -> None:
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
        ctx = self.max_len()
        if self.tm is not None and ctx < self.tm.context:
            ctx_words = f"{ctx} tokens (its whole KV cache; the model's context is {self.tm.context})"
        else:
            ctx_words = f"{ctx} tokens"
        if prompt_len >= ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx_words}, and your {param} has "
                f"{prompt_len} tokens; leave room for at least one generated token.", param=param,
                code="context_length_exceeded")
        if prompt_len + max_tokens > ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {ctx_words}. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} for the "
                f"completion). Reduce max_tokens to at most {ctx - prompt_len}.", param="max_tokens",
                code="context_length_exceeded")

    async def generate(self, request: TextParams) -> AsyncGenerator[Delta | Usage, None]:
        # The queue slot is taken before tokenizing, so max_waiting bounds the tokenizer's backlog.
        self._count_waiting(+1, limit=self.entry.max_waiting)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[RequestEvent] = asyncio.Queue()
        added, rid = False, f"{request.request_id}-{next(self._ids)}"
        try:
            prompt_ids = await loop.run_in_executor(self._tokenizer_pool, self.tokenize, request)
            if self._draining or self.engine is None:
                raise UnavailableError("The server is shutting down.", headers={"Retry-After": "5"})
            with self._lock:
                if self._engine_exited:
                    raise UnavailableError(f"The engine of model '{self.entry.id}' stopped and is restarting; "
                                           "retry shortly.", headers={"Retry-After": "5"})
                self._pending[rid] = _Pending(loop, out, self._meter(len(prompt_ids)))
            self.engine.add(rid, prompt_ids, request.params)
            self._engine_ids[request.request_id] = rid
            added = True
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
                deltas, error, done = self._merge(events, request.params.logprobs)
                finished = finished or done
                for d in deltas:
                    yield d
                if error is not None:  # after what came before it, so a stream shows all it produced
                    raise error
                if finished:
                    yield Usage(events[-1].prompt_tokens, events[-1].completion_tokens)
        finally:
            self._engine_ids.pop(request.request_id, None)
            if not finished:  # the client left, or the deadline passed: out of the batch at the next step
                self.engine.abort(rid)

    def stop_choice(self, request_id: str, index: int) -> bool:
        """Choice ``index`` drops out of the batch at the engine's next step; the others go on."""
        rid = self._engine_ids.get(request_id)
        if rid is not None and self.engine is not None:
            self.engine.abort(rid, index)
        return True

    def _merge(self, events: list[RequestEvent], logprobs: int | None
               ) -> tuple[list[Delta], BaseException | None, bool]:
        """One delta per choice from consecutive events; the first error stops the merge."""
        deltas: dict[int, Delta] = {}
        finished = False
        for ev in events:
            if ev.error is not None:
                return list(deltas.values()), _client_error(ev.error), finished
            for o in ev.outputs:
                d = self._delta(o, logprobs)
                if (prev := deltas.get(d.index)) is None:
                    deltas[d.index] = d
                    continue
                prev.text += d.text
                prev.finish_reason = d.finish_reason
                prev.num_tokens += 1
                if prev.logprobs is not None:
                    prev.logprobs += d.logprobs or []
            finished = finished or ev.finished
        return list(deltas.values()), None, finished

    def check_room(self, task: str) -> None:
        with self._lock:
            self._refuse_if_full(self.entry.max_waiting)

    def _refuse_if_full(self, limit: int) -> None:
        if self._waiting >= limit:
            raise RateLimitError(f"Too many requests waiting for model '{self.entry.id}' ({self._waiting} "
                                 f"queued, limit {limit}); retry shortly.", headers={"Retry-After": "1"})

    def _count_waiting(self, delta: int, limit: int | None = None) -> None:
        with self._lock:
            if limit is not None:
                self._refuse_if_full(limit)
            self._waiting += delta
            self.metrics.num_requests_waiting.labels(self.entry.id).set(self._waiting)

    # reader thread: the engine's events ------------------------------------------------------
    def _meter(self, prompt_tokens: int) -> Callable[[RequestEvent], None]:
        """Meters one request's events as they arrive (tokens, queue time, finish reasons)."""
        m, mid = self.metrics, self.entry.id
        started = False

        def meter(ev: RequestEvent) -> None:
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

        return meter

    def _on_step(self, events: list[tuple[str, RequestEvent]] | None, stats: StepStats) -> None:
        """One engine step's events, posted with one wake-up per event loop; ``None``: the engine died."""
        if events is None:
            with self._lock:
                self._engine_exited = True
                pending, self._pending = self._pending, {}
                if self.engine is not None:
                    self._restarts = restarts_after_exit(self._restarts, time.monotonic() - self.engine.started)
            gone = UnavailableError(f"The engine of model '{self.entry.id}' stopped; retry shortly.",
                                    headers={"Retry-After": "5"})
            if not self._draining:
                threading.Thread(target=self._restart_engine, name=f"engine-restart-{self.entry.id}",
                                 daemon=True).start()
            events = [(rid, RequestEvent([], finished=True, error=gone)) for rid in pending]
        else:
            with self._lock:
                pending = {rid: self._pending[rid] for rid, ev in events if rid in self._pending}
                for rid, ev in events:
                    if ev.finished:
                        self._pending.pop(rid, None)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestEvent]]] = {}
        for rid, ev in events:
            if (p := pending.get(rid)) is not None:
                p.meter(ev)
                by_loop.setdefault(p.loop, []).append((p.out, ev))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)
        self._record(stats)

    def _restart_engine(self) -> None:
        """A new engine process after the last one died (killed, out of memory, a crashed kernel):
        its requests have failed with 503; new ones get 503 until it is loaded. Backs off 1, 2, 4 ...
        60 s between attempts, so a model that crashes at once does not spin; an engine that ran for
        ``RESTART_BACKOFF_RESET_S`` before dying starts over at 1 s."""
        while not self._draining:
            time.sleep(min(60.0, 2.0 ** self._restarts))
            self._restarts += 1
            client = EngineClient(self._spec, self.entry.id, self._on_step)
            try:
                client.start()
            except Exception as exc:  # logged; the next attempt waits longer
                log.error("restarting the engine of %s failed: %s", self.entry.id, exc)
                continue
            with self._lock:
                self.engine, self._engine_exited = client, False
            log.warning("engine of %s restarted (process %d, restart %d)", self.entry.id, client.process.pid,
                        self._restarts)
            return

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


def _client_error(error: BaseException) -> BaseException:
    """The engine's error as the client should see it."""
    if isinstance(error, EngineShutdown):
        return UnavailableError("The server is shutting down.", headers={"Retry-After": "5"})
    if isinstance(error, EngineError):
        return InvalidRequestError(str(error), param="max_tokens", code="context_length_exceeded")
    return error


def _put_all(items: list[tuple[asyncio.Queue, RequestEvent]]) -> None:
    for out, ev in items:
        out.put_nowait(ev)
