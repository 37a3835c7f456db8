"""Models on another server: another genserve (a GPU node) for every modality, or any
OpenAI-compatible server (vLLM) for text and embeddings.

Each modality's remote backend implements the same Protocol as the local one (``base.py``) by
speaking genserve's public API to the upstream, so serving cannot tell them apart and the output
checks cover both. What the upstream made comes back as it made it: images and audio as the
upstream's encoded bytes (``ImageArtifact.encoded``, ``AudioChunk.encoded``), passed through, so
a seeded request through a gateway gets the bytes the upstream gives directly. Text always streams
from upstream (whatever the client asked), so time to first token and the client's own streaming
choice work the same as locally.

Upstream errors come back with their status and OpenAI body; an unreachable upstream is a 503, a
slow one a 504, a malformed answer a 502. Readiness asks the upstream for its model list, one
probe at a time per backend (concurrent checks share it), and marks the probe with ``PROBE_HEADER``
so that a genserve upstream answers from what it already knows instead of probing its own remote
models: an entry that points back at its own server (or a cycle of gateways) costs one request,
not a fan-out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from genserve.app.backends.base import (
    AudioChunk,
    Backend,
    Delta,
    EmbeddingResult,
    ImageArtifact,
    ImageEvent,
    ModelFacts,
    Molecule,
    MoleculeEvent,
    MoleculeStats,
    Progress,
    TextEvent,
    TokenLogprob,
    Usage,
)
from genserve.app.errors import DeadlineError, GenserveError, RateLimitError, UnavailableError, UpstreamError
from genserve.app.registry import ConfigError, ModelEntry
from genserve.models.params import (
    ImageInterpolationParams,
    ImageParams,
    MoleculeInterpolationParams,
    MoleculeParams,
    MusicParams,
    SamplingParams,
    SpeechParams,
    TextParams,
)

log = logging.getLogger(__name__)
READY_CACHE_SECONDS = 5.0
PROBE_HEADER = "x-genserve-probe"  # a readiness probe from a gateway: answer without probing further
SEED_HEADER = "x-genserve-seed"
AUDIO_READ_BYTES = 16_384


class RemoteBackend(Backend):
    """The HTTP side every remote backend shares: the client, errors, readiness and the upstream's facts."""

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
        self._probe: asyncio.Task[bool] | None = None
        self._facts = ModelFacts()

    # lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.check_ready()  # so /v1/models shows the truth from the first request on

    def ready(self) -> bool:
        return self._ready

    async def check_ready(self) -> bool:
        """The upstream's answer for this model, at most one probe per ``READY_CACHE_SECONDS``;
        callers that arrive while a probe runs wait for that probe."""
        if time.monotonic() - self._ready_at <= READY_CACHE_SECONDS:
            return self._ready
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._ask_ready())
        return await asyncio.shield(self._probe)

    async def _ask_ready(self) -> bool:
        """Ready while the upstream answers its model list (as an OpenAI-compatible server does);
        this model's card there, if listed, gives its facts."""
        try:
            resp = await self.client.get("models", timeout=2.0, headers={PROBE_HEADER: "1"})
            self._ready = resp.status_code == 200
            if self._ready:
                cards = [c for c in resp.json().get("data") or [] if isinstance(c, dict)]
                card = next((c for c in cards if c.get("id") == self.upstream_model), None)
                self._facts = _facts(card) if card is not None else self._facts
        except (httpx.HTTPError, ValueError, AttributeError):
            self._ready = False
        self._ready_at = time.monotonic()
        return self._ready

    def describe(self) -> ModelFacts:
        return self._facts

    async def close(self) -> None:
        await self.client.aclose()

    # requests ---------------------------------------------------------------------------------
    async def _post(self, path: str, body: dict[str, Any] | None = None, stream: bool = False,
                    files: dict[str, tuple[str, bytes, str]] | None = None) -> httpx.Response:
        try:
            if files is not None:  # multipart: form fields as text, as OpenAI's SDK sends them
                data = {k: str(v) for k, v in (body or {}).items() if v is not None}
                req = self.client.build_request("POST", path, data=data, files=files)
            else:
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

    async def _post_json(self, path: str, body: dict[str, Any], what: str,
                         files: dict[str, tuple[str, bytes, str]] | None = None) -> dict[str, Any]:
        resp = await self._post(path, body, files=files)
        try:
            payload = resp.json()
        except ValueError as exc:
            raise self._bad_upstream(f"sent a malformed {what} response ({exc})") from exc
        if not isinstance(payload, dict):
            raise self._bad_upstream(f"sent a {what} response that is not a JSON object")
        return payload

    async def _sse(self, resp: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON objects of an upstream's server-sent events, until ``[DONE]``; an ``error``
        object in the stream becomes the upstream's error."""
        try:
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                raise self._bad_upstream("answered a streaming request without server-sent events")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise self._bad_upstream(f"sent a malformed event ({exc})") from exc
                if not isinstance(chunk, dict):
                    raise self._bad_upstream(f"sent an event that is not a JSON object: {data[:80]}")
                if "error" in chunk:  # an error after the stream began (vLLM puts the HTTP status in code)
                    code = chunk["error"].get("code") if isinstance(chunk["error"], dict) else None
                    raise UpstreamError(code if isinstance(code, int) and 400 <= code < 500 else 502, chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        finally:
            await resp.aclose()

    def _transport_error(self, exc: httpx.HTTPError) -> GenserveError:
        if isinstance(exc, httpx.TimeoutException):
            return DeadlineError(f"The upstream of model '{self.entry.id}' timed out.")
        return UnavailableError(f"The upstream of model '{self.entry.id}' is unreachable or dropped the "
                                f"connection ({type(exc).__name__}).", headers={"Retry-After": "5"})

    def _bad_upstream(self, what: str) -> UpstreamError:
        return UpstreamError(502, {"error": {"message": f"The upstream of model '{self.entry.id}' {what}.",
                                             "type": "server_error", "code": "bad_upstream_response"}})


def _facts(card: dict[str, Any]) -> ModelFacts:
    """What an upstream's model card says (genserve's cards carry more than OpenAI's)."""
    ints = {k: card.get(k) if isinstance(card.get(k), int) else None for k in ("context_length", "sample_rate")}
    return ModelFacts(context_length=ints["context_length"], sample_rate=ints["sample_rate"])


# text and embeddings ----------------------------------------------------------------------------
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


class RemoteTextBackend(RemoteBackend):
    def stop_choice(self, request_id: str, index: int) -> bool:
        return False  # OpenAI's API cannot stop one choice of a stream: the caller closes it when done

    async def decode(self, ids: list[int]) -> str | None:
        return None  # the upstream's tokenizer is not here

    async def token_ids(self, text: str) -> tuple[list[int], int] | None:
        return None

    async def generate(self, request: TextParams) -> AsyncGenerator[TextEvent, None]:
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
        choices = 0
        async with contextlib.aclosing(self._sse(resp)) as chunks:  # closing us closes the upstream response
            async for chunk in chunks:
                try:
                    events = _text_events(chunk, chat)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise self._bad_upstream(f"sent a malformed chunk ({exc})") from exc
                for event in events:
                    choices += isinstance(event, Delta)
                    yield event
        if not choices:
            raise self._bad_upstream("ended its stream without any choice")


class RemoteEmbeddingBackend(RemoteBackend):
    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> EmbeddingResult:
        body: dict[str, Any] = {"model": self.upstream_model, "input": inputs}
        if dimensions is not None:
            body["dimensions"] = dimensions
        payload = await self._post_json("embeddings", body, "embeddings")
        try:
            vectors = [d["embedding"] for d in sorted(payload["data"], key=lambda d: d["index"])]
            if len(vectors) != len(inputs):
                raise ValueError(f"{len(vectors)} embeddings for {len(inputs)} inputs")
            return EmbeddingResult(vectors, int((payload.get("usage") or {}).get("prompt_tokens", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._bad_upstream(f"sent a malformed embeddings response ({exc})") from exc


def _text_events(chunk: dict[str, Any], chat: bool) -> list[TextEvent]:
    events: list[TextEvent] = [_delta(choice, chat) for choice in chunk.get("choices") or []]
    if chunk.get("usage"):
        u = chunk["usage"]
        events.append(Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)))
    return events


def _delta(choice: dict[str, Any], chat: bool) -> Delta:
    lps: list[TokenLogprob] | None
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


# images -----------------------------------------------------------------------------------------
class RemoteImageBackend(RemoteBackend):
    async def generate(self, params: ImageParams) -> AsyncGenerator[ImageEvent, None]:
        first = params.jobs[0]
        body: dict[str, Any] = {
            "model": self.upstream_model, "prompt": first.prompt, "n": len(params.jobs), "size": params.size,
            "seed": first.seed, "num_inference_steps": first.steps, "guidance_scale": first.guidance_scale,
            "scheduler": first.scheduler, "negative_prompt": first.negative_prompt,
            "response_format": "b64_json"}
        if params.upload is not None:  # an edit: the files as the caller sent them
            body["strength"] = first.strength
            files = {"image": ("image.png", params.upload, "image/png")}
            if params.upload_mask is not None:
                files["mask"] = ("mask.png", params.upload_mask, "image/png")
            payload = await self._post_json("images/edits", body, "images", files=files)
            for artifact in self._artifacts(payload, "image/png"):
                yield artifact
            return
        body = {k: v for k, v in body.items() if v is not None}
        if not params.stream:
            for artifact in self._artifacts(await self._post_json("images/generations", body, "images"),
                                             "image/png"):
                yield artifact
            return
        # A genserve upstream sends its progress only when asked; whether the caller sees it is decided here.
        resp = await self._post("images/generations", {**body, "stream": True, "stream_progress": True}, stream=True)
        async with contextlib.aclosing(self._sse(resp)) as events:
            async for event in events:
                if event.get("type") == "image_generation.progress":
                    yield self._progress(event)
                elif event.get("type") == "image_generation.completed":
                    for artifact in self._completed(event):
                        yield artifact

    def _completed(self, event: dict[str, Any]) -> list[ImageArtifact]:
        """One image, as OpenAI's event has it; or, from an older genserve upstream, all of them in ``data``."""
        if "data" in event and "b64_json" not in event:
            return self._artifacts(event, "image/png")
        try:
            return [ImageArtifact(encoded=base64.b64decode(event["b64_json"], validate=True),
                                  media_type=f"image/{event.get('output_format') or 'png'}", seed=event.get("seed"))]
        except (ValueError, KeyError, TypeError) as exc:
            raise self._bad_upstream(f"sent a malformed image_generation.completed event ({exc})") from exc

    def _progress(self, event: dict[str, Any]) -> Progress:
        try:
            return Progress(int(event["step"]), int(event["total_steps"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._bad_upstream(f"sent a malformed progress event ({exc})") from exc

    async def interpolate(self, params: ImageInterpolationParams) -> AsyncGenerator[ImageArtifact, None]:
        body = {"model": self.upstream_model, "seed_start": params.seed_start, "seed_end": params.seed_end,
                "frames": params.frames, "method": params.method, "format": params.format,
                "class": params.class_name, "size": params.size, "response_format": "b64_json"}
        payload = await self._post_json("images/interpolations", {k: v for k, v in body.items() if v is not None},
                                        "images")
        for artifact in self._artifacts(payload, "image/gif" if params.format == "gif" else "image/png"):
            yield artifact

    def _artifacts(self, payload: dict[str, Any], media_type: str) -> list[ImageArtifact]:
        try:
            return [ImageArtifact(encoded=base64.b64decode(d["b64_json"], validate=True), media_type=media_type,
                                  seed=d.get("seed")) for d in payload["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise self._bad_upstream(f"sent a malformed images response ({exc})") from exc


# audio ------------------------------------------------------------------------------------------
class RemoteAudioBackend(RemoteBackend):
    async def speak(self, params: SpeechParams) -> AsyncGenerator[AudioChunk, None]:
        body = {"model": self.upstream_model, "input": params.text, "voice": params.voice, "speed": params.speed,
                "response_format": params.response_format, "seed": params.seed}
        resp = await self._post("audio/speech", {k: v for k, v in body.items() if v is not None}, stream=True)
        try:
            async for data in resp.aiter_bytes(AUDIO_READ_BYTES):
                yield AudioChunk(encoded=data)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        finally:
            await resp.aclose()

    async def compose(self, params: MusicParams) -> AudioChunk:
        body = {"model": self.upstream_model, "seconds": params.seconds, "tempo": params.tempo, "key": params.key,
                "temperature": params.temperature, "seed": params.seed, "response_format": params.response_format}
        resp = await self._post("audio/music", body)
        seed = resp.headers.get(SEED_HEADER)
        return AudioChunk(encoded=resp.content, seed=int(seed) if seed and seed.isdigit() else params.seed)


# molecules --------------------------------------------------------------------------------------
class RemoteMoleculeBackend(RemoteBackend):
    async def generate(self, params: MoleculeParams) -> AsyncGenerator[MoleculeEvent, None]:
        body = {"model": self.upstream_model, "n": params.n, "seed": params.seed, "temperature": params.temperature,
                "top_k": params.top_k, "unique": params.unique, "max_samples": params.max_samples,
                "max_seconds": params.max_seconds, "constraints": params.constraints, "include": params.include}
        payload = await self._post_json("molecules/generations", body, "molecules")
        try:
            molecules = [Molecule(smiles=m["smiles"], selfies=m["selfies"], properties=m.get("properties"),
                                  novel=m.get("novel"), similarity=m.get("similarity"), svg=m.get("svg"))
                         for m in payload["data"]]
            s, usage = payload["stats"], payload.get("usage") or {}
            stats = MoleculeStats(
                requested=s["requested"], returned=s["returned"], sampled=s["sampled"], invalid=s["invalid"],
                duplicates=s["duplicates"], rejected_by_constraints=s["rejected_by_constraints"],
                withheld_by_moderation=s["withheld_by_moderation"], stopped_by=s["stopped_by"],
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._bad_upstream(f"sent a malformed molecules response ({exc})") from exc
        for molecule in molecules:
            yield molecule
        yield stats

    async def interpolate(self, params: MoleculeInterpolationParams) -> list[Molecule]:
        body = {"model": self.upstream_model, "start": params.start, "end": params.end, "steps": params.steps,
                "method": params.method, "include": params.include}
        payload = await self._post_json("molecules/interpolations", body, "molecules")
        try:
            return [Molecule(smiles=m.get("smiles"), selfies=str(m["selfies"]), properties=m.get("properties"),
                             svg=m.get("svg")) for m in sorted(payload["data"], key=lambda d: d["index"])]
        except (KeyError, TypeError) as exc:
            raise self._bad_upstream(f"sent a malformed interpolation response ({exc})") from exc


# The remote backend of each modality.
REMOTE_BACKENDS: dict[str, type[RemoteBackend]] = {
    "text": RemoteTextBackend, "embedding": RemoteEmbeddingBackend, "image": RemoteImageBackend,
    "audio": RemoteAudioBackend, "molecule": RemoteMoleculeBackend,
}
