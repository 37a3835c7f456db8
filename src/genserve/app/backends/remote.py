"""Any OpenAI-compatible server as a backend: vLLM on a GPU node, or another genserve process.

Text requests always stream from upstream (whatever the client asked), so serving receives the
same ``Delta`` events as from a local runner: time to first token, moderation and the client's
own streaming choice all work the same. Upstream errors come back with their status and OpenAI
body; an unreachable upstream is a 503, a slow one a 504.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from genserve.app.backends.base import Backend, Delta, EmbeddingResult, TokenLogprob, Usage
from genserve.app.errors import DeadlineError, GenserveError, RateLimitError, UnavailableError, UpstreamError
from genserve.app.registry import ConfigError, ModelEntry
from genserve.models.params import TextParams
from genserve.models.text.sampling import SamplingParams

log = logging.getLogger(__name__)
READY_CACHE_SECONDS = 5.0


def upstream_body(params: SamplingParams) -> dict[str, Any]:
    """OpenAI fields for ``params``; vLLM's extensions only when set, as OpenAI rejects them."""
    body: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p, "n": params.n,
                            "presence_penalty": params.presence_penalty,
                            "frequency_penalty": params.frequency_penalty}
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.stop:
        body["stop"] = params.stop
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    extensions = {"top_k": (params.top_k, 0), "min_p": (params.min_p, 0.0),
                  "repetition_penalty": (params.repetition_penalty, 1.0),
                  "ignore_eos": (params.ignore_eos, False), "min_tokens": (params.min_tokens, 0)}
    body.update({k: v for k, (v, default) in extensions.items() if v != default})
    return body


class RemoteBackend(Backend):
    def __init__(self, entry: ModelEntry, timeout_s: float) -> None:
        super().__init__(entry)
        headers = {}
        if entry.api_key_env:
            key = os.environ.get(entry.api_key_env)
            if not key:
                raise ConfigError(f"model {entry.id!r}: api_key_env names {entry.api_key_env}, which is "
                                  "not set in the environment")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(base_url=(entry.url or "").rstrip("/") + "/", headers=headers,
                                        timeout=httpx.Timeout(timeout_s, connect=5.0))
        self.upstream_model = entry.upstream_model or entry.id
        self._ready_at = 0.0
        self._ready = False

    async def start(self) -> None:
        await self.check_ready()  # so /v1/models shows the truth from the first request on

    def ready(self) -> bool:
        return self._ready

    async def check_ready(self) -> bool:
        if time.monotonic() - self._ready_at > READY_CACHE_SECONDS:
            try:
                self._ready = (await self.client.get("models", timeout=2.0)).status_code == 200
            except httpx.HTTPError:
                self._ready = False
            self._ready_at = time.monotonic()
        return self._ready

    async def close(self) -> None:
        await self.client.aclose()

    async def _post(self, path: str, body: dict[str, Any], stream: bool) -> httpx.Response:
        try:
            req = self.client.build_request("POST", path, json=body)
            resp = await self.client.send(req, stream=stream)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if resp.status_code < 400:
            return resp
        raw = await resp.aread()
        await resp.aclose()
        if resp.status_code in (401, 403):  # the gateway's own credentials: the operator's problem
            raise UnavailableError(f"The upstream of model '{self.entry.id}' refused genserve's credentials "
                                   f"(HTTP {resp.status_code}); check the entry's api_key_env.")
        if resp.status_code == 429:
            raise RateLimitError(f"The upstream of model '{self.entry.id}' is busy; retry shortly.",
                                 headers={"Retry-After": resp.headers.get("retry-after", "1")})
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": {"message": raw.decode(errors="replace")[:500]}}
        raise UpstreamError(resp.status_code, payload if isinstance(payload, dict) else {})

    def _transport_error(self, exc: httpx.HTTPError) -> GenserveError:
        if isinstance(exc, httpx.TimeoutException):
            return DeadlineError(f"The upstream of model '{self.entry.id}' timed out.")
        return UnavailableError(f"The upstream of model '{self.entry.id}' is unreachable or dropped the "
                                f"connection ({type(exc).__name__}).", headers={"Retry-After": "5"})

    async def generate(self, request: TextParams) -> AsyncGenerator[Delta | Usage, None]:
        p = request.params
        body = {"model": self.upstream_model, **upstream_body(p), "stream": True,
                "stream_options": {"include_usage": True}}
        chat = request.messages is not None
        if chat:
            body["messages"] = request.messages
            if p.logprobs is not None:
                body.update(logprobs=True, top_logprobs=p.logprobs)
        else:
            body["prompt"] = request.prompt
            if p.logprobs is not None:
                body["logprobs"] = p.logprobs
        resp = await self._post("chat/completions" if chat else "completions", body, stream=True)
        try:
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                raise self._bad_upstream("answered a streaming request without server-sent events")
            choices = 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                for event in self._parse_chunk(data, chat):
                    choices += isinstance(event, Delta)
                    yield event
            if not choices:
                raise self._bad_upstream("ended its stream without any choice")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        finally:
            await resp.aclose()

    def _parse_chunk(self, data: str, chat: bool) -> list[Delta | Usage]:
        try:
            chunk = json.loads(data)
            if not isinstance(chunk, dict):
                raise TypeError(f"a chunk must be a JSON object, not {type(chunk).__name__}")
            if "error" in chunk:  # an error after the stream began (vLLM puts the HTTP status in code)
                code = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
                raise UpstreamError(code if isinstance(code, int) and 400 <= code < 500 else 502, chunk)
            return _events(chunk, chat)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._bad_upstream(f"sent a malformed chunk ({exc})") from exc

    def _bad_upstream(self, what: str) -> UpstreamError:
        return UpstreamError(502, {"error": {"message": f"The upstream of model '{self.entry.id}' {what}.",
                                             "type": "server_error", "code": "bad_upstream_response"}})

    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> EmbeddingResult:
        body: dict[str, Any] = {"model": self.upstream_model, "input": inputs}
        if dimensions is not None:
            body["dimensions"] = dimensions
        resp = await self._post("embeddings", body, stream=False)
        try:
            payload = resp.json()
            vectors = [d["embedding"] for d in sorted(payload["data"], key=lambda d: d["index"])]
            if len(vectors) != len(inputs):
                raise ValueError(f"{len(vectors)} embeddings for {len(inputs)} inputs")
            return EmbeddingResult(vectors, int((payload.get("usage") or {}).get("prompt_tokens", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._bad_upstream(f"sent a malformed embeddings response ({exc})") from exc


def _events(chunk: dict[str, Any], chat: bool) -> list[Delta | Usage]:
    events: list[Delta | Usage] = [_delta(choice, chat) for choice in chunk.get("choices") or []]
    if chunk.get("usage"):
        u = chunk["usage"]
        events.append(Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)))
    return events


def _delta(choice: dict[str, Any], chat: bool) -> Delta:
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content")
        lps = [TokenLogprob(t["token"], t["logprob"],
                            [(a["token"], a["logprob"]) for a in t.get("top_logprobs") or []])
               for t in content] if content is not None else None
    else:
        text = choice.get("text") or ""
        lp = choice.get("logprobs")
        lps = [TokenLogprob(tok, val, list((top or {}).items()))
               for tok, val, top in zip(lp["tokens"], lp["token_logprobs"],
                                        lp.get("top_logprobs") or [None] * len(lp["tokens"]), strict=True)
               ] if lp else None
    return Delta(choice.get("index", 0), text, lps, choice.get("finish_reason"))
