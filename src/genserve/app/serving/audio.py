"""Audio: speech streamed as it is spoken, and music composed, rendered and encoded.

Speech checks everything it can before the first byte (model, voice, length, format), then waits
for the first chunk of audio, so a full queue or a failing model is still an HTTP error and not a
cut-off 200; after that, encoded bytes go out as each chunk of audio comes. Audio past the model's
``limits.max_audio_seconds`` is cut off and logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from genserve.app.backends.base import AudioChunk, MusicBackend, SpeechBackend
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError
from genserve.app.metrics import Metrics
from genserve.app.moderation.service import ModerationService
from genserve.app.provenance.service import ProvenanceService
from genserve.app.schemas.audio import MusicRequest, SpeechRequest
from genserve.app.serving.common import Deadline, seed_or_random, unless_disconnected
from genserve.app.serving.media import FORMATS, OUTPUT_RATE, ChunkEncoder, audio_bytes
from genserve.app.settings import Settings
from genserve.app.tenancy import CURRENT, Usage, note_usage
from genserve.models.params import MusicParams, SpeechParams

log = logging.getLogger(__name__)
SEED_HEADER = "x-genserve-seed"
MUSIC_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "mid": "audio/midi"}


class AudioServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings,
                 moderation: ModerationService, provenance: ProvenanceService) -> None:
        self.manager, self.metrics, self.settings, self.moderation = manager, metrics, settings, moderation
        self.provenance = provenance

    # speech -----------------------------------------------------------------------------------
    async def speech(self, body: SpeechRequest, raw: Request) -> Response:
        backend = await self.manager.acquire(body.model, "speech", SpeechBackend)
        limits = backend.entry.limits
        if len(body.input) > limits.max_input_chars:
            raise InvalidRequestError(f"input has {len(body.input)} characters; this model accepts at most "
                                      f"{limits.max_input_chars}.", param="input")
        if body.instructions:  # "" asks for nothing, like null
            raise InvalidRequestError(f"The model '{body.model}' does not take instructions.",
                                      param="instructions")
        await self.moderation.check_input(body.model, [("input", body.input)], raw)
        params = SpeechParams(text=body.input, voice=body.voice, speed=body.speed,
                              response_format=body.response_format, seed=body.seed)
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)
        chunks = self._checked(deadline.stream(backend.speak(params)))
        started = time.perf_counter()
        try:
            first = await anext(chunks)
        except StopAsyncIteration:  # nothing to say (only punctuation, say): a valid empty file
            rate = backend.describe().sample_rate or OUTPUT_RATE
            first = AudioChunk(samples=np.zeros(0, dtype=np.float32), sample_rate=rate)
        fmt = FORMATS[body.response_format]
        # The headers go first, so the claim is made before the bytes: FLAC comes out whole at the end and
        # is signed then (``signs``); every other format streams and is not.
        signed = self.provenance.signs(backend.entry, fmt.media_type, streamed=fmt.streams)
        provenance = self.provenance.media(backend.entry, fmt.media_type, signed, streamed=fmt.streams)

        def finish(encoder: ChunkEncoder) -> bytes:  # the last bytes; a format made whole is the file, signed
            if fmt.streams:
                return encoder.finish()
            return self.provenance.mark_file(backend.entry, None, encoder.finish, fmt.media_type)[0]

        stream = self._encode_speech(body, first, chunks, started, limits.max_audio_seconds, finish)
        return StreamingResponse(stream, media_type=fmt.media_type, headers=self.provenance.headers(provenance))

    @staticmethod
    async def _checked(chunks: AsyncGenerator[AudioChunk]) -> AsyncGenerator[AudioChunk]:
        """The one point every chunk of a backend's audio passes before it is encoded: provenance marks
        (watermarks) go here. Speech is its checked ``input`` read aloud, and genserve has no audio
        classifier, so output moderation of audio is the input check (docs/moderation.md)."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def _encode_speech(self, body: SpeechRequest, first: AudioChunk, rest: AsyncGenerator[AudioChunk],
                             started: float, cap_s: float, finish: Callable[[ChunkEncoder], bytes]
                             ) -> AsyncGenerator[bytes]:
        """The encoded speech as it is made, then ``finish``'s last bytes (all of a FLAC, signed)."""
        encoder, produced, full = ChunkEncoder(body.response_format, OUTPUT_RATE), 0, False
        usage = CURRENT.get()  # the key's: this generator may be closed outside the request's context
        try:
            chunk: AudioChunk | None = first
            while chunk is not None:
                if (samples := chunk.samples) is not None:  # an upstream's encoded bytes are capped upstream
                    cap = int(cap_s * (chunk.sample_rate or 0))
                    if produced + len(samples) > cap:
                        log.warning("speech for %s cut off at %.0f s (limits.max_audio_seconds)", body.model, cap_s)
                        samples = samples[: cap - produced]
                        chunk = dataclasses.replace(chunk, samples=samples)
                    produced += len(samples)
                    full = produced >= cap
                if data := await asyncio.to_thread(encoder.feed, chunk):
                    yield data
                chunk = None if full else await anext(rest, None)
            yield await asyncio.to_thread(finish, encoder)
        finally:
            await rest.aclose()
            self._observe(body.model, encoder.seconds_out, time.perf_counter() - started, usage)

    # music ------------------------------------------------------------------------------------
    async def music(self, body: MusicRequest, raw: Request) -> Response:
        backend = await self.manager.acquire(body.model, "music", MusicBackend)
        cap = backend.entry.limits.max_audio_seconds
        if body.seconds > cap:
            raise InvalidRequestError(f"seconds={body.seconds:g} exceeds this model's limit of {cap:g}.",
                                      param="seconds")
        seed = seed_or_random(body.seed)
        params = MusicParams(seconds=body.seconds, tempo=body.tempo, key=body.key, temperature=body.temperature,
                             seed=seed, response_format=body.response_format)
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)
        started = time.perf_counter()

        async def run() -> Response:
            piece = self._checked_piece(await deadline.run(backend.compose(params)))
            media_type = MUSIC_MEDIA_TYPES[body.response_format]
            data, signed = await asyncio.to_thread(self.provenance.mark_file, backend.entry, piece.encoded,
                                                   lambda: audio_bytes(piece, body.response_format), media_type)
            self._observe(body.model, body.seconds, time.perf_counter() - started)
            provenance = self.provenance.media(backend.entry, media_type, signed)
            return Response(data, media_type=media_type,
                            headers={SEED_HEADER: str(seed), **self.provenance.headers(provenance)})

        return await unless_disconnected(raw, run())

    @staticmethod
    def _checked_piece(piece: AudioChunk) -> AudioChunk:
        """The one point a composed piece passes before it is encoded (music's ``_checked``)."""
        return piece

    def _observe(self, model: str, audio_seconds: float, wall_seconds: float, usage: Usage | None = None) -> None:
        note_usage("audio", audio_seconds, usage)
        if audio_seconds > 0:
            self.metrics.audio_seconds.labels(model).inc(audio_seconds)
            self.metrics.audio_real_time_factor.labels(model).observe(wall_seconds / audio_seconds)
