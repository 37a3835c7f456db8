"""Completions and chat: schema → ``TextParams`` → backend events → ``_checked`` → OpenAI JSON or SSE.

Both endpoints share one path. Each prompt becomes one backend request (its ``n`` choices
numbered ``prompt_index * n + i``, as OpenAI numbers them); their events are merged, metered,
bounded by the deadline and, for non-streaming calls, cancelled when the client disconnects.
The first event is awaited before any byte is sent, so a bad prompt or a full queue still gets a
proper 4xx status even for ``stream: true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from fastapi import Request
from fastapi.responses import Response

from genserve.app.backends.base import Delta, TextBackend, TokenLogprob, Usage
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import GenserveError, InvalidRequestError, WorkerLostError, internal_error
from genserve.app.metrics import Metrics
from genserve.app.moderation.gate import Released
from genserve.app.moderation.service import ModerationService, TextStream
from genserve.app.provenance.service import ProvenanceService
from genserve.app.schemas.base import UsageInfo
from genserve.app.schemas.chat import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from genserve.app.schemas.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from genserve.app.schemas.provenance import Provenance
from genserve.app.schemas.sampling import SamplingFields
from genserve.app.serving.common import (
    Deadline,
    event_stream,
    now,
    request_id,
    response_id,
    unless_disconnected,
)
from genserve.app.settings import Settings
from genserve.app.tenancy import CURRENT, note_usage
from genserve.models.params import TextParams

FinishReason = Literal["stop", "length", "content_filter"]
log = logging.getLogger(__name__)


@dataclass
class _Choice:
    """One choice accumulated from its deltas (non-streaming responses)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass
class _Call:
    """What one API call needs while it runs."""

    kind: str  # "completion" | "chat"
    body: SamplingFields
    backend: TextBackend
    response_id: str
    provenance: Provenance  # what marks the output carries (genserve's extension on every response)
    requests: list[TextParams] = field(default_factory=list)  # one per prompt, choices numbered i * n + k
    gate: TextStream | None = None  # output moderation, when the model's policy checks output
    created: int = field(default_factory=now)
    usage: Usage = field(default_factory=lambda: Usage(0, 0))

    @property
    def model(self) -> str:
        return self.body.model

    @property
    def wants_logprobs(self) -> bool:
        # completions: an int, where 0 still asks for the sampled tokens' logprobs; chat: a bool
        lp = self.body.logprobs  # type: ignore[attr-defined]
        return lp is not None and lp is not False


class TextServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings,
                 moderation: ModerationService, provenance: ProvenanceService) -> None:
        self.manager, self.metrics, self.settings, self.moderation = manager, metrics, settings, moderation
        self.provenance = provenance

    async def completions(self, body: CompletionRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "completion", TextBackend)
        prompts = body.prompts()
        self._check_caps(body, backend, len(prompts), body.logprobs, "logprobs")
        if self.moderation.policy_for(body.model).checks_input:
            await self.moderation.check_input(body.model, await _prompt_texts(prompts, backend), raw)
        params = body.to_sampling_params()
        call = _Call("completion", body, backend, response_id("cmpl"), self.provenance.text(backend.entry, params))
        rid = request_id(raw)
        requests = [TextParams(f"{rid}-{i}", copy.deepcopy(params), prompt=p, streamed=bool(body.stream))
                    for i, p in enumerate(prompts)]
        return await self._respond(call, requests, raw)

    async def chat(self, body: ChatCompletionRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "chat", TextBackend)
        self._check_caps(body, backend, 1, body.top_logprobs, "top_logprobs")
        if body.max_completion_tokens and body.max_tokens and body.max_completion_tokens != body.max_tokens:
            raise InvalidRequestError("Give max_completion_tokens or max_tokens, not two different values.",
                                      param="max_completion_tokens")
        messages = body.chat_messages()
        await self.moderation.check_input(body.model, [(f"messages[{i}].content", m["content"])
                                                       for i, m in enumerate(messages) if m["content"]], raw)
        params = body.to_sampling_params()
        call = _Call("chat", body, backend, response_id("chatcmpl"), self.provenance.text(backend.entry, params))
        return await self._respond(call, [TextParams(request_id(raw), params, messages=messages,
                                                     streamed=bool(body.stream))], raw)

    def _check_caps(self, body: SamplingFields, backend: TextBackend, prompts: int, logprobs: int | None,
                    logprobs_param: str) -> None:
        limits = backend.entry.limits
        if body.n > limits.max_n:
            raise InvalidRequestError(f"n={body.n} exceeds this model's limit of {limits.max_n}.", param="n")
        if prompts > limits.max_prompts:
            raise InvalidRequestError(f"{prompts} prompts exceed this model's limit of {limits.max_prompts} "
                                      "per request.", param="prompt")
        if logprobs is not None and logprobs > limits.max_top_logprobs:
            raise InvalidRequestError(f"{logprobs_param}={logprobs} exceeds this model's limit of "
                                      f"{limits.max_top_logprobs}.", param=logprobs_param)
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if limits.max_tokens is not None and requested is not None and requested > limits.max_tokens:
            raise InvalidRequestError(f"max_tokens={requested} exceeds this model's limit of "
                                      f"{limits.max_tokens}.", param="max_tokens")

    # the shared path ---------------------------------------------------------------------------
    async def _respond(self, call: _Call, requests: list[TextParams], raw: Request) -> Any:
        deadline = Deadline.start(call.backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)
        for attempt in (0, 1):
            call.requests, call.gate = requests, self.moderation.text_stream(call.model, raw)
            if call.gate is not None and (halt := call.gate.halt) is not None:
                for r in requests:  # the engine stops a sequence in the step that writes a blocked term
                    r.params.halt = halt
            events = deadline.stream(self._checked(call, self._metered(call, self._merged(call.backend, requests,
                                                                                        call.body.n))))
            if not call.body.stream:
                return await unless_disconnected(raw, self._collect(call, events))
            # The first event before any byte: errors keep their status, and a client that leaves
            # while its request is queued aborts it.
            try:
                first = await unless_disconnected(raw, anext(events, None))
                break
            except WorkerLostError:
                # Its worker died while the hold-back window still held all it made: nothing reached the
                # client, so the request runs again, from the start, once.
                await events.aclose()
                if attempt:
                    raise
                self.metrics.replica_retries.labels(call.model, "stream").inc()
                log.warning("%s: its worker died before the first byte; running it again", call.response_id)
            except BaseException:
                await events.aclose()
                raise
        if isinstance(first, Response):
            await events.aclose()
            return first
        return event_stream(self._sse(call, first, events), self.settings.shutdown_grace_s, sep="\n")

    async def _merged(self, backend: TextBackend, requests: list[TextParams], n: int
                      ) -> AsyncGenerator[Delta | Usage, None]:
        """The events of every prompt's request, choice indices offset, usage summed at the end."""
        if len(requests) == 1:
            async with contextlib.aclosing(backend.generate(requests[0])) as events:
                async for event in events:
                    yield event
            return
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(offset: int, request: TextParams) -> None:
            try:
                async with contextlib.aclosing(backend.generate(request)) as events:
                    async for event in events:
                        if isinstance(event, Delta):
                            event.index += offset
                        await queue.put(event)
            except BaseException as exc:
                await queue.put(exc)
            finally:
                await queue.put(end)

        tasks = [asyncio.create_task(pump(i * n, r)) for i, r in enumerate(requests)]
        usage, ended = Usage(0, 0), 0
        try:
            while ended < len(tasks):
                event = await queue.get()
                if event is end:
                    ended += 1
                elif isinstance(event, BaseException):
                    raise event
                elif isinstance(event, Usage):
                    usage.prompt_tokens += event.prompt_tokens
                    usage.completion_tokens += event.completion_tokens
                else:
                    yield event
            yield usage
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _checked(self, call: _Call, events: AsyncGenerator[Delta | Usage]) -> AsyncGenerator[Delta | Usage]:
        """The one point every backend event passes before any JSON or SSE is made of it: output
        moderation. Each choice's text goes through its hold-back gate (``moderation.gate``): only
        checked text comes out; a blocked choice ends with ``finish_reason: "content_filter"``, nothing
        of its held text released, and its generation stops (the engine drops that sequence at its next
        step; an upstream stream is closed once no choice is wanted)."""
        gate = call.gate
        try:
            if gate is None:
                async for event in events:
                    yield event
                return
            open_choices = set(range(call.body.n * len(call.requests)))
            tokens, unstoppable = 0, False
            async for event in events:
                if isinstance(event, Usage):  # the last event: the stream ends by itself after it
                    yield event
                    continue
                i = event.index
                if gate.is_blocked(i):
                    continue
                tokens += event.num_tokens
                out = None
                if event.text or event.logprobs:
                    out = await gate.feed(i, event.text, event.logprobs, event.num_tokens)
                ours = gate.halt is not None and call.backend.entry.backend != "remote"  # terms handed to our engine
                if event.finish_reason == "content_filter" and ours:
                    gate.halted(i)  # the engine's own check of those terms (``gate.halt``)
                if not gate.is_blocked(i) and event.finish_reason:
                    tail = await gate.finish(i)
                    if tail is not None:
                        out = _joined(out, tail)
                if gate.is_blocked(i):
                    open_choices.discard(i)
                    # The stop goes out first: the yield below suspends this generator while the delta is
                    # encoded and written, and every millisecond of that the engine steps on. A choice the
                    # backend has finished itself needs none, and the backend's usage still comes.
                    if event.finish_reason is None and not self._stop_choice(call, i):
                        unstoppable = True  # the backend goes on making it: close the stream once none is open
                    yield Delta(i, "", finish_reason="content_filter", num_tokens=0)
                    if unstoppable and not open_choices:
                        yield Usage(0, tokens)  # the upstream's own count is lost with its stream
                        return
                    continue
                if out is not None and (out.text or out.logprobs or event.finish_reason):
                    yield Delta(i, out.text, out.logprobs if event.logprobs is not None else None,
                                event.finish_reason, num_tokens=out.num_tokens)
                if event.finish_reason:
                    open_choices.discard(i)
        finally:
            await events.aclose()

    def _stop_choice(self, call: _Call, index: int) -> bool:
        n = call.body.n
        request = call.requests[index // n]
        return call.backend.stop_choice(request.request_id, index % n)

    async def _metered(self, call: _Call, events: AsyncGenerator[Delta | Usage]) -> AsyncGenerator[Delta | Usage]:
        """Time to first token, inter-token latency and end-to-end latency for every backend; tokens
        and finish reasons too for backends that do not count them step by step themselves."""
        m, mid, count = self.metrics, call.model, not call.backend.meters_tokens
        ttft, itl = m.time_to_first_token.labels(mid), m.inter_token_latency.labels(mid)
        start = time.perf_counter()
        last: dict[int, float] = {}
        finished = aborted = False
        usage, generated, charged = CURRENT.get(), 0, False  # the key's, kept for a late finally
        try:
            async for event in events:
                t = time.perf_counter()
                if isinstance(event, Delta):
                    generated += event.num_tokens
                    if not last:
                        ttft.observe(t - start)
                    elif event.index in last:  # k merged tokens: k gaps of a k-th of the wait each
                        for _ in range(event.num_tokens):
                            itl.observe((t - last[event.index]) / event.num_tokens)
                    last[event.index] = t
                    if count and event.finish_reason:
                        m.request_success.labels(mid, event.finish_reason).inc()
                else:
                    call.usage = event
                    note_usage("text", event.prompt_tokens + event.completion_tokens, usage)
                    charged = True
                    if count:
                        m.prompt_tokens.labels(mid).inc(event.prompt_tokens)
                        m.generation_tokens.labels(mid).inc(event.completion_tokens)
                yield event
            finished = True
        except (GeneratorExit, asyncio.CancelledError):  # the client left or the deadline passed
            aborted = True
            raise
        except WorkerLostError:  # nothing of it reached the client; a run again charges its own tokens
            generated = 0
            raise
        finally:
            if not charged:  # cut off before its usage came (the client left, a deadline): what was made
                note_usage("text", generated, usage)
            if finished:
                m.e2e_request_latency.labels(mid).observe(time.perf_counter() - start)
            elif aborted and count:  # an error from the backend is not a finished request
                m.request_success.labels(mid, "abort").inc()
            with contextlib.suppress(Exception):
                await events.aclose()

    def _released(self, call: _Call, text: str) -> None:
        """Counts moderated output as it reaches the wire: against the checked count, the coverage."""
        if call.gate is not None and text:
            self.metrics.moderation_chars.labels(call.model, "released").inc(len(text))

    # non-streaming -----------------------------------------------------------------------------
    async def _collect(self, call: _Call, events: AsyncGenerator[Delta | Usage]) -> Any:
        choices: dict[int, _Choice] = {}
        async for event in events:
            if isinstance(event, Delta):
                c = choices.setdefault(event.index, _Choice())
                c.text += event.text
                self._released(call, event.text)
                c.logprobs.extend(event.logprobs or [])
                # backends report the engine's or an OpenAI upstream's reasons: stop or length
                c.finish_reason = cast(FinishReason | None, event.finish_reason) or c.finish_reason
        usage, want_lp = _usage(call.usage), call.wants_logprobs
        if call.kind == "completion":
            return CompletionResponse(
                id=call.response_id, created=call.created, model=call.model, usage=usage, provenance=call.provenance,
                choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                                          logprobs=_completion_logprobs(c.logprobs, 0) if want_lp else None)
                         for i, c in sorted(choices.items())])
        return ChatCompletionResponse(
            id=call.response_id, created=call.created, model=call.model, usage=usage, provenance=call.provenance,
            choices=[ChatChoice(index=i, message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                                logprobs=ChatLogprobs(content=_chat_logprobs(c.logprobs)) if want_lp else None)
                     for i, c in sorted(choices.items())])

    # streaming ---------------------------------------------------------------------------------
    async def _sse(self, call: _Call, first: Delta | Usage | None,
                   events: AsyncGenerator[Delta | Usage]) -> AsyncGenerator[str]:
        include_usage = call.body.include_usage
        chunk = _chunker(call, include_usage)
        offsets: dict[int, int] = {}
        try:
            if call.kind == "chat":
                for i in range(call.body.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            pending = [first] if first is not None else []
            async for event in _chain(pending, events):
                if isinstance(event, Usage):
                    continue
                self._released(call, event.text)
                for choice in _stream_choices(call, event, offsets):
                    yield chunk([choice])
            if include_usage:
                yield chunk([], usage=_usage(call.usage).model_dump())
        except GenserveError as err:  # after the headers: the error travels as an event
            yield json.dumps(err.body())
        except Exception:
            log.exception("stream of %s failed", call.response_id)
            yield json.dumps(internal_error(call.response_id).body())
        finally:
            await events.aclose()
        yield "[DONE]"


async def _prompt_texts(prompts: list, backend: TextBackend) -> list[tuple[str, str]]:
    """The prompts to moderate, each with its parameter; token-id prompts as the model's tokenizer reads
    them (a backend that cannot decode them gets them refused while input moderation is on)."""
    out = []
    for i, p in enumerate(prompts):
        param = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
        if isinstance(p, str):
            out.append((param, p))
            continue
        text = await backend.decode(p)
        if text is None:
            raise InvalidRequestError("Token-id prompts cannot be moderated for this model; send text.", param=param,
                                      code="content_policy_violation")
        out.append((param, text))
    return out


def _joined(a: Released | None, b: Released) -> Released:
    if a is None:
        return b
    return Released(a.text + b.text, a.logprobs + b.logprobs, a.num_tokens + b.num_tokens)


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _chunker(call: _Call, include_usage: bool) -> Callable[..., str]:
    """Makes the stream's chunks; the first carries the response's ``provenance``."""
    obj = "chat.completion.chunk" if call.kind == "chat" else "text_completion"
    first = True

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        nonlocal first
        out: dict[str, Any] = {"id": call.response_id, "object": obj, "created": call.created,
                               "model": call.model, "system_fingerprint": None, "choices": choices}
        if include_usage:
            out["usage"] = usage
        if first:
            out["provenance"], first = call.provenance.model_dump(), False
        return json.dumps(out, ensure_ascii=False)

    return chunk


def _stream_choices(call: _Call, d: Delta, offsets: dict[int, int]) -> list[dict]:
    """The chunk choices for one delta: its text (if any), then its finish (chat sends it apart)."""
    out: list[dict] = []
    has_content = bool(d.text or d.logprobs)
    if call.kind == "completion":
        if has_content or d.finish_reason:
            lp = None
            if call.wants_logprobs and d.logprobs:
                lp = _completion_logprobs(d.logprobs, offsets.get(d.index, 0)).model_dump()
            offsets[d.index] = offsets.get(d.index, 0) + sum(len(t.token) for t in d.logprobs or [])
            out.append({"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason})
        return out
    if has_content:
        lp = None
        if call.wants_logprobs and d.logprobs:
            lp = {"content": [c.model_dump() for c in _chat_logprobs(d.logprobs)]}
        out.append({"index": d.index, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": None})
    if d.finish_reason:
        out.append({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason})
    return out


def _usage(u: Usage) -> UsageInfo:
    return UsageInfo(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                     total_tokens=u.prompt_tokens + u.completion_tokens)


def _completion_logprobs(lps: list[TokenLogprob], start: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = start
    for t in lps:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(dict(t.top))
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


def _chat_logprobs(lps: list[TokenLogprob]) -> list[ChatTokenLogprob]:
    return [ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                             top_logprobs=[ChatTopLogprob(token=a, logprob=v, bytes=list(a.encode()))
                                           for a, v in t.top])
            for t in lps]
