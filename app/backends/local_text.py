"""In-process text generation: one runner thread per model, fed by a bounded waiting queue.

The runner takes one request at a time (its ``n`` samples batched) and runs ``generate`` on it,
checking before every forward pass whether the request was aborted. Outputs go back to the
request's asyncio queue on the event loop. This is the simple, correct path; the
continuous-batching engine replaces the runner without changing this class's interface.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.backends.base import STALL_SECONDS, Backend, Delta, TextRequest, TokenLogprob, Usage, check_token_ids
from app.errors import InvalidRequestError, RateLimitError, UnavailableError
from app.metrics import Metrics
from app.registry import ModelEntry
from models.families import load_family
from models.text.generate import SampleOutput, TextModel, generate

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: TextRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    enqueued: float = field(default_factory=time.perf_counter)
    aborted: threading.Event = field(default_factory=threading.Event)


_DONE = object()


class LocalTextBackend(Backend):
    meters_tokens = True  # per step, so aborted requests count what they really generated

    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.metrics = metrics
        self.tm: TextModel | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None
        # Off the event loop: a prompt at the body cap takes most of a second to tokenize. One
        # thread, so the tokenizer never sees concurrent calls.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenize-{entry.id}")
        self._chars_per_token = 0  # the most characters one token decodes to (+1 for a joining space)
        self._draining = False

    # lifecycle --------------------------------------------------------------------------------
    def setup(self) -> None:
        e = self.entry
        self.tm = load_family(e.family or "", e.resolved_source or e.source or "", e.device, e.dtype)
        tok = self.tm.tokenizer
        self._chars_per_token = 1 + max(map(len, tok.batch_decode([[i] for i in range(len(tok))])))
        self._thread = threading.Thread(target=self._loop, name=f"runner-{e.id}", daemon=True)
        self._thread.start()
        self.loaded = True

    def ready(self) -> bool:
        if not self.loaded or self._thread is None or not self._thread.is_alive():
            return False
        started = self._step_started
        return started is None or time.monotonic() - started < STALL_SECONDS

    def drain(self) -> None:
        self._draining = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.out.put_nowait(UnavailableError("The server is shutting down.", headers={"Retry-After": "5"}))
                job.out.put_nowait(_DONE)

    async def close(self) -> None:
        """Fails what is still queued and stops the runner after its current request."""
        self.drain()
        self._jobs.put(None)
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
        job: _Job | None = None
        try:
            loop = asyncio.get_running_loop()
            prompt_ids = await loop.run_in_executor(self._tokenizer_pool, self.tokenize, request)
            if self._draining:
                raise UnavailableError("The server is shutting down.", headers={"Retry-After": "5"})
            job = _Job(request, prompt_ids, loop, asyncio.Queue())
            self._jobs.put(job)
        finally:
            if job is None:
                self._count_waiting(-1)
        try:
            while (item := await job.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.aborted.set()  # no-op once finished; otherwise the runner drops it at the next step

    def _count_waiting(self, delta: int, limit: int | None = None) -> None:
        with self._lock:
            if limit is not None and self._waiting >= limit:
                raise RateLimitError(f"Too many requests waiting for model '{self.entry.id}' ({self._waiting} "
                                     f"queued, limit {limit}); retry shortly.", headers={"Retry-After": "1"})
            self._waiting += delta
            self.metrics.num_requests_waiting.labels(self.entry.id).set(self._waiting)

    # runner thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            m, mid = self.metrics, self.entry.id
            self._count_waiting(-1)
            if job.aborted.is_set():
                m.request_success.labels(mid, "abort").inc()
                continue
            m.request_queue_time.labels(mid).observe(time.perf_counter() - job.enqueued)
            m.num_requests_running.labels(mid).set(1)
            try:
                self._run(job)
            except Exception as exc:  # reaches the client as a 500; the runner lives on
                log.exception("generation failed for %s", job.request.request_id)
                job.loop.call_soon_threadsafe(job.out.put_nowait, exc)
            finally:
                self._step_started = None
                m.num_requests_running.labels(mid).set(0)
                job.loop.call_soon_threadsafe(job.out.put_nowait, _DONE)

    def _run(self, job: _Job) -> None:
        tm, params, m, mid = self.tm, job.request.params, self.metrics, self.entry.id
        assert tm is not None
        m.prompt_tokens.labels(mid).inc(len(job.prompt_ids))
        generated, finished = 0, {}
        tokens_counter = m.generation_tokens.labels(mid)
        self._step_started = time.monotonic()
        for outs in generate(tm, job.prompt_ids, params, job.aborted.is_set):
            self._step_started = time.monotonic()
            generated += len(outs)
            tokens_counter.inc(len(outs))
            for o in outs:
                if o.finish_reason:
                    finished[o.index] = o.finish_reason
                job.loop.call_soon_threadsafe(job.out.put_nowait, self._delta(o, params.logprobs))
        if job.aborted.is_set() and len(finished) < params.n:
            m.request_success.labels(mid, "abort").inc()
            return
        for reason in finished.values():
            m.request_success.labels(mid, reason).inc()
        job.loop.call_soon_threadsafe(job.out.put_nowait, Usage(len(job.prompt_ids), generated))

    def _delta(self, o: SampleOutput, logprobs: int | None) -> Delta:
        lp = None
        if logprobs is not None and self.tm is not None:
            dec = self.tm.tokenizer.decode
            lp = [TokenLogprob(dec([o.token.token_id]), o.token.logprob or 0.0,
                               [(dec([t]), v) for t, v in o.token.top])]
        return Delta(o.index, o.text, lp, o.finish_reason)
