"""The text engine in its own process, as vLLM v1 runs its EngineCore beside the API server.

In one process the engine's Python (scheduling, sampling, detokenizing) and the event loop's
(HTTP, SSE) take turns on the GIL; on a two-core host that alone makes every engine step about a
quarter slower under streaming load. Here the gateway keeps the tokenizer, the checks and the HTTP
work; a spawned child owns the model, the KV cache and the ``LLMEngine``.

Gateway → child, over a pipe, in order: ``("add", rid, prompt_ids, params)``, ``("abort", rid, index or None)``,
``("fail_waiting",)``, ``("stop",)``. Child → gateway: ``("ready", info)`` once loaded (or
``("failed", message)``), then after every step ``("step", [(rid, RequestEvent), ...], StepStats)``.
The child reads commands between steps and sleeps on the pipe when it has no work.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from genserve.app import logs
from genserve.models.text.engine import EngineConfig, EngineShutdown, RequestEvent, StepStats
from genserve.models.text.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class EngineSpec:
    """What the child needs to build the engine (plain values: it crosses a process boundary)."""

    family: str
    source: str
    device: str
    dtype: str
    quantization: str
    threads: int
    wide_threads: int  # for steps with a burst of prompts (EngineConfig.wide_step_threads); 0: never
    kv_cache_tokens: int | None
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int | None


def engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The child: load, report, then step whenever there is work, between commands."""
    logs.setup_child()
    import torch

    from genserve.models.common.loading import load_family
    from genserve.models.text.engine import LLMEngine

    try:
        torch.set_num_threads(spec.threads)
        tm = load_family(spec.family, spec.source, spec.device, spec.dtype, quantization=spec.quantization)
        config = EngineConfig.for_model(tm.context, spec.kv_cache_tokens, spec.block_size, spec.max_num_seqs,
                                        spec.max_num_batched_tokens, spec.wide_threads)
        engine = LLMEngine(tm, config)
    except Exception:
        conn.send(("failed", traceback.format_exc(limit=3)))
        return
    conn.send(("ready", {"config": config, "kv_cache_bytes": engine.kv_cache_bytes()}))
    events: list[tuple[str, RequestEvent]] = []

    def callback(rid: str) -> Callable[[RequestEvent], None]:
        return lambda ev: events.append((rid, ev))

    while True:
        # Block on the pipe only when idle; otherwise take what has arrived and step.
        while conn.poll(None if not engine.has_work() else 0):
            cmd = conn.recv()
            if cmd[0] == "add":
                _, rid, prompt_ids, params = cmd
                try:
                    engine.add_request(rid, prompt_ids, params, callback(rid))
                except ValueError as exc:
                    events.append((rid, RequestEvent([], finished=True, error=exc)))
            elif cmd[0] == "abort":
                engine.abort(cmd[1], cmd[2])
            elif cmd[0] == "fail_waiting":
                engine.fail_waiting(EngineShutdown("the server is shutting down"))
            elif cmd[0] == "stop":  # whatever is still in the engine learns why before the child exits
                engine.fail_all(EngineShutdown("the server is shutting down"))
                conn.send(("step", events, StepStats()))
                return
        try:
            stats = engine.step()
        except Exception as exc:  # the requests in flight fail (500); the engine goes on empty
            log.exception("engine step failed")
            engine.fail_all(RuntimeError(f"engine step failed: {type(exc).__name__}"))
            stats = StepStats()
        conn.send(("step", events, stats))
        events = []


class EngineClient:
    """The gateway's handle on the child: sends commands without blocking the event loop, and
    hands each step's events to ``on_step`` on a reader thread."""

    def __init__(self, spec: EngineSpec, name: str, on_step: Callable[[list | None, StepStats], None]) -> None:
        self.spec, self.name, self.on_step = spec, name, on_step
        ctx = mp.get_context("spawn")  # never fork a process that holds threads and torch state
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_main, args=(child, spec), name=f"engine-{name}", daemon=True)
        self._outbox: queue.Queue[tuple | None] = queue.Queue()
        # ``_pipe`` is held while a command goes down the pipe; ``_unsent`` (under ``_count``, never held
        # long) counts commands put but not yet sent, so an abort may skip the queue (and the sender
        # thread's wake-up) only when nothing is ahead of it. The event loop never waits on ``_pipe``.
        self._pipe, self._count = threading.Lock(), threading.Lock()
        self._unsent = 0
        self.info: dict[str, Any] = {}
        self.last_message = self.started = time.monotonic()
        self.stopping = False  # stop() was called: the child's exit is expected

    def start(self, timeout: float = 600.0) -> None:
        """Starts the child and waits until its model is loaded; raises with its error otherwise."""
        self.process.start()
        if not self._conn.poll(timeout):
            self.process.kill()
            raise RuntimeError(f"engine process for {self.name} did not load within {timeout:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"engine process for {self.name} exited with code {self.process.exitcode}") from None
        if kind == "failed":
            raise RuntimeError(f"engine process for {self.name} failed to load:\n{payload}")
        self.info = payload
        self.started = time.monotonic()  # serving from now: how long it lived counts from here
        threading.Thread(target=self._send_loop, name=f"engine-send-{self.name}", daemon=True).start()
        threading.Thread(target=self._recv_loop, name=f"engine-recv-{self.name}", daemon=True).start()

    def alive(self) -> bool:
        return self.process.is_alive()

    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._put(("add", rid, prompt_ids, params))

    def abort(self, rid: str, index: int | None = None) -> None:
        """Aborts request ``rid``, or only its choice ``index``: sent at once when no command is ahead of
        it and the pipe is free (a stop that waits for the sender thread lets the engine step on: it
        waits for the GIL up to the switch interval), else queued behind them."""
        cmd = ("abort", rid, index)
        if self._pipe.acquire(blocking=False):
            try:
                with self._count:
                    first = self._unsent == 0
                if first:
                    self._conn.send(cmd)  # a few bytes: the child reads the pipe before every step
                    return
            except (BrokenPipeError, OSError):
                return  # the child is gone; the reader reports it
            finally:
                self._pipe.release()
        self._put(cmd)

    def fail_waiting(self) -> None:
        self._put(("fail_waiting",))

    def stop(self) -> None:
        self.stopping = True
        self._put(("stop",))
        self._outbox.put(None)

    def _put(self, cmd: tuple) -> None:
        with self._count:
            self._unsent += 1
        self._outbox.put(cmd)

    def join(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()

    def _send_loop(self) -> None:
        while (cmd := self._outbox.get()) is not None:
            with self._pipe:
                try:
                    self._conn.send(cmd)
                except (BrokenPipeError, OSError):
                    return  # the child is gone; the reader reports it
                except Exception:  # one bad command must not silence every later one
                    log.exception("could not send %r to the engine of %s", cmd[0], self.name)
                finally:
                    with self._count:
                        self._unsent -= 1

    def _recv_loop(self) -> None:
        while True:
            try:
                _, events, stats = self._conn.recv()  # ("step", events, stats)
            except (EOFError, OSError):
                self.process.join(5)
                if self.stopping:
                    log.info("engine process for %s stopped (code %s)", self.name, self.process.exitcode)
                else:
                    log.error("engine process for %s exited (code %s)", self.name, self.process.exitcode)
                self.on_step(None, StepStats())
                return
            self.last_message = time.monotonic()
            try:
                self.on_step(events, stats)
            except Exception:  # a failing callback must not leave every later request waiting
                log.exception("handling a step of the engine of %s failed", self.name)
