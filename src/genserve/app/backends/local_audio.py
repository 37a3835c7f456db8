"""In-process audio: text-to-speech and music.

Speech from a streaming family (espeak-ng) runs one process per request, at most
``max_batch_size`` at once, and its audio is read while the process is still speaking. Speech from
a neural family is cut into pieces (``split_text``) that go through a ``DynamicBatcher``, so pieces
of concurrent requests with the same voice and speed share forward passes, and each request gets its
pieces back in order as they are ready. Music specs go through a ``DynamicBatcher`` too: every
sampling step of a batch is one forward pass for all of its pieces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import subprocess
import threading
from collections.abc import AsyncGenerator
from typing import IO, Any

import numpy as np

from genserve.app.backends.base import AudioChunk, ModelFacts
from genserve.app.backends.batching import BatchedBackend
from genserve.app.errors import InvalidRequestError, RateLimitError
from genserve.models.audio import SpeechSpec, speakable, split_text
from genserve.models.audio.espeak import pcm16_to_float, read_wav_header
from genserve.models.params import MusicParams, SpeechParams
from genserve.models.seeding import item_seed

READ_BYTES = 16_384  # espeak-ng output read at a time: about 0.37 s of 22.05 kHz audio


class _AudioBackend(BatchedBackend):
    def setup(self) -> None:
        self.model = self.load_model()
        self.loaded = True

    def describe(self) -> ModelFacts:
        return ModelFacts(sample_rate=self.model.sample_rate if self.model is not None else None)


class LocalSpeechBackend(_AudioBackend):
    _processes: asyncio.Semaphore | None = None  # espeak-ng processes at once (a streaming family, once started)

    async def start(self) -> None:
        if self.model.streams:
            self._processes = asyncio.Semaphore(self.entry.max_batch_size)
            self._queued = 0  # requests waiting for a process: at most the entry's max_waiting
        else:
            self.start_batcher(self.model.synthesize, key=lambda s: (s.voice, s.speed))

    def ready(self) -> bool:
        return self.loaded if self.model is not None and self.model.streams else super().ready()

    async def speak(self, params: SpeechParams) -> AsyncGenerator[AudioChunk, None]:
        """Mono float32 chunks at the model's rate, in order, as they are produced (400 naming
        ``voice`` for a voice the model does not have)."""
        try:
            voice = self.model.resolve_voice(params.voice)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="voice") from None
        text = speakable(params.text)
        if not text:
            raise InvalidRequestError("input has nothing to speak: emoji and other pictographs are not read out.",
                                      param="input")
        spec = SpeechSpec(text, voice, params.speed, params.seed)
        rate, tempo = self.model.sample_rate, self.model.residual_tempo(params.speed)
        async with contextlib.aclosing(self._samples(spec)) as pieces:  # closing us stops espeak-ng at once
            async for samples in pieces:
                yield AudioChunk(samples=samples, sample_rate=rate, residual_tempo=tempo)

    async def _samples(self, spec: SpeechSpec) -> AsyncGenerator[np.ndarray, None]:
        if self.model.streams:
            async with contextlib.aclosing(self._speak_process(spec)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        assert self.batcher is not None
        pieces = [dataclasses.replace(spec, text=t, seed=None if spec.seed is None else item_seed(spec.seed, i))
                  for i, t in enumerate(split_text(spec.text))]
        async with contextlib.aclosing(self.batcher.submit_stream(pieces)) as audio:
            async for piece in audio:
                yield piece

    def check_room(self, task: str) -> None:
        if self._processes is None:  # pieces through the batcher (or not started: get() says so)
            super().check_room(task)
        elif self._processes.locked() and self._queued >= self.entry.max_waiting:
            raise RateLimitError(f"Too many requests waiting for this model ({self._queued} queued, limit "
                                 f"{self.entry.max_waiting}); retry shortly.", headers={"Retry-After": "1"})

    async def _speak_process(self, spec: SpeechSpec) -> AsyncGenerator[np.ndarray, None]:
        processes = self._processes
        assert processes is not None  # start() made it: this family streams
        self.check_room("speech")
        self._queued += 1
        try:
            await processes.acquire()
        finally:
            self._queued -= 1
        try:
            async with contextlib.aclosing(self._run_process(spec)) as chunks:  # closing stops the process
                async for chunk in chunks:
                    yield chunk
        finally:
            processes.release()

    async def _run_process(self, spec: SpeechSpec) -> AsyncGenerator[np.ndarray, None]:
        """espeak-ng's samples as it writes them. The process starts from a thread (``_spawn``), its text is
        written from a thread of its own (it may be longer than a pipe holds while espeak-ng waits for its
        output to be read), and its output is read on the event loop (``_read``)."""
        proc = await _spawn(self.model.argv(spec))
        assert proc.stdin is not None and proc.stdout is not None
        threading.Thread(target=_feed, args=(proc.stdin, spec.text.encode()), name="espeak-feed", daemon=True).start()
        try:
            os.set_blocking(proc.stdout.fileno(), False)
            buf, start = b"", None
            while data := await _read(proc.stdout.fileno(), READ_BYTES):
                buf += data
                if start is None and (header := read_wav_header(buf)) is not None:
                    start = header[1]
                    buf = buf[start:]
                if start is not None and len(buf) >= 2:
                    cut = len(buf) // 2 * 2
                    yield pcm16_to_float(buf[:cut])
                    buf = buf[cut:]
            if await asyncio.to_thread(proc.wait) != 0:
                raise RuntimeError(f"espeak-ng exited with status {proc.returncode}")
        finally:
            try:
                proc.stdout.close()  # _feed closes stdin
            finally:
                if proc.returncode is None:  # the caller left: stop speaking
                    _stop(proc)


async def _read(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes of the non-blocking ``fd`` once it has some (b"" at its end). The file stays
    the caller's to close: uvloop's ``connect_read_pipe`` closed a pipe's descriptor itself and then the
    file closed the same number again, which may by then be another request's pipe (MagicStack/uvloop#763)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(fd, _resolve, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def _spawn(argv: list[str]) -> subprocess.Popen:
    """``argv`` started with pipes for stdin and stdout, by ``subprocess.Popen`` in a thread: CPython
    starts it with ``vfork``, while the event loop's own spawn (uvloop's) forks this large process, copying
    its page tables as the loop waits: the loop held 4.95 ms (median) at 2 GiB resident, against 0.24 ms
    from the thread (benchmarks/spawn_latency.py). A caller that leaves while it starts does not leave it
    behind, even when the loop itself ends: the process goes to a thread-side future, whose callback (run
    by that thread, loop or no loop) stops a process nobody took."""
    started: concurrent.futures.Future[subprocess.Popen] = concurrent.futures.Future()
    started.set_running_or_notify_cancel()  # running from now: nobody can cancel it, only leave it

    def start() -> None:
        try:
            started.set_result(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL))
        except BaseException as exc:
            started.set_exception(exc)

    threading.Thread(target=start, name="espeak-spawn", daemon=True).start()
    try:
        return await asyncio.wrap_future(started)
    except asyncio.CancelledError:
        started.add_done_callback(lambda f: None if f.exception() else _abandon(f.result()))
        raise


def _abandon(proc: subprocess.Popen) -> None:
    """A process started for a caller that left: its pipes closed, and stopped."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Killed, and reaped by a thread of its own: no await (a request being cancelled has its awaits
    cancelled too), no pool thread held."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    threading.Thread(target=proc.wait, name="espeak-reap", daemon=True).start()


def _feed(stdin: IO[bytes], text: bytes) -> None:
    """The text to speak, written and closed."""
    with contextlib.suppress(BrokenPipeError), stdin:  # the process was stopped: nothing left to say
        stdin.write(text)


class LocalMusicBackend(_AudioBackend):
    async def start(self) -> None:
        self.start_batcher(self._stepped)

    def _stepped(self, specs: list[Any]) -> list[Any]:
        """The batch's pieces, each grid step counted (``genserve_music_steps_total``) and reported to the
        batcher (a long piece that steps is not stalled); the run stops at the next step once every
        caller of the batch has gone."""
        steps, mid = self.metrics.music_steps, self.entry.id

        def tick(_step: int, _total: int) -> None:
            steps.labels(mid).inc()
            self.stepped(f"{len(specs)} piece(s)")

        return self.model.generate(specs, tick)

    async def compose(self, params: MusicParams) -> AudioChunk:
        """The piece as MIDI bytes for ``response_format: mid``, else rendered to samples (off the event
        loop); 400 naming ``key`` for a key the model cannot write in."""
        from genserve.models.music import MusicSpec, render  # a music model is loaded: so is this
        from genserve.models.music.midi import to_midi

        assert self.batcher is not None
        try:
            self.model.parse_key(params.key)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="key") from None
        spec = MusicSpec(seconds=params.seconds, tempo=params.tempo, key=params.key,
                         temperature=params.temperature, seed=params.seed)
        (piece,) = await self.batcher.submit_many([spec])
        if params.response_format == "mid":
            return AudioChunk(encoded=await asyncio.to_thread(to_midi, piece), seed=params.seed)
        rate = self.model.sample_rate
        return AudioChunk(samples=await asyncio.to_thread(render, piece, rate), sample_rate=rate, seed=params.seed)
