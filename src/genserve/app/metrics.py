"""Prometheus metrics. Text metrics mirror vLLM's names and meanings under a ``genserve`` prefix
(``vllm:time_to_first_token_seconds`` → ``genserve_time_to_first_token_seconds``), labelled by
``model_name`` as vLLM does. Each app owns its registry, so tests can run several apps.

On Ray Serve each replica (gateway or model) has its own registry; ``Metrics.gather`` then adds the other
replicas' series to the gateway's ``/metrics`` (app/ray_app.py), merged by ``merge_exposition``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._rendering: asyncio.Future[bytes] | None = None
        # Set on a Ray Serve replica: takes this registry's text and returns it with the other replicas'.
        self.gather: Callable[[bytes], Awaitable[bytes]] | None = None
        m = ["model_name"]
        self.http_requests = Counter("genserve_http_requests", "HTTP requests by route and status",
                                     ["method", "route", "status"], registry=r)
        self.http_latency = Histogram("genserve_http_request_duration_seconds",
                                      "HTTP request latency until the response ends", ["method", "route"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("genserve_time_to_first_token_seconds",
                                             "Time from request to first generated token", m,
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("genserve_inter_token_latency_seconds",
                                             "Time between consecutive output tokens", m,
                                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("genserve_e2e_request_latency_seconds",
                                             "End-to-end request latency", m, buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.request_queue_time = Histogram("genserve_request_queue_time_seconds",
                                            "Time a request waited before its model started on it", m,
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("genserve_prompt_tokens", "Prefill tokens processed", m, registry=r)
        self.generation_tokens = Counter("genserve_generation_tokens", "Generated tokens", m, registry=r)
        self.num_requests_running = Gauge("genserve_num_requests_running",
                                          "Requests the model is working on", m, registry=r)
        self.num_requests_waiting = Gauge("genserve_num_requests_waiting",
                                          "Requests queued for the model", m, registry=r)
        self.request_success = Counter("genserve_request_success", "Finished requests by reason",
                                       [*m, "finished_reason"], registry=r)
        self.batch_size = Histogram("genserve_batch_size", "Items per batched model call", m,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.kv_cache_usage = Gauge("genserve_kv_cache_usage_perc",
                                    "Share of the KV cache's blocks in use (1 = full)", m, registry=r)
        self.num_preemptions = Counter("genserve_num_preemptions", "Sequences preempted (to recompute later) "
                                       "because the KV cache was full", m, registry=r)
        self.iteration_tokens = Histogram("genserve_iteration_tokens_total", "Tokens (prefill + decode) in one "
                                          "engine step", m, buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                                                     4096, 8192), registry=r)
        # Molecules: validity rate = 1 - invalid / sampled; constraint rejection rate = rejected / sampled.
        self.molecules_sampled = Counter("genserve_molecules_sampled", "Strings a molecule generator sampled",
                                         m, registry=r)
        self.molecules = Counter("genserve_molecules", "Sampled molecules by outcome: returned, invalid, "
                                 "duplicate, rejected (by constraints), withheld (by moderation)",
                                 [*m, "outcome"], registry=r)
        # Images: denoising step latency is per batched step (one step of every image in the batch).
        self.images = Counter("genserve_images", "Images generated", m, registry=r)
        self.denoising_step_seconds = Histogram("genserve_denoising_step_seconds", "Latency of one denoising "
                                                "step of a batch", m, buckets=(*TOKEN_BUCKETS, 10.0), registry=r)
        # Audio: real-time factor = seconds of compute per second of audio (below 1: faster than real time).
        self.audio_seconds = Counter("genserve_audio_seconds", "Seconds of audio generated", m, registry=r)
        self.music_steps = Counter("genserve_music_steps", "Grid steps (a sixteenth note of all four voices) a "
                                   "music model sampled, per batch", m, registry=r)
        self.audio_real_time_factor = Histogram("genserve_audio_real_time_factor", "Wall time of a request "
                                                "divided by the seconds of audio it produced", m,
                                                buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                                                registry=r)
        # Moderation: coverage = chars{kind="checked"} / chars{kind="released"} must be 1 (no text leaves
        # unchecked); failures are classifier errors or timeouts, by what the policy did about them.
        self.moderation_checks = Counter("genserve_moderation_checks", "Moderation checks run",
                                         [*m, "direction"], registry=r)
        self.moderation_flags = Counter("genserve_moderation_flags", "Moderation flags by category and action "
                                        "(blocked, or flagged only)", [*m, "direction", "category", "action"],
                                        registry=r)
        self.moderation_check_seconds = Histogram("genserve_moderation_check_seconds", "Latency of one "
                                                  "moderation check", ["direction"], buckets=TOKEN_BUCKETS,
                                                  registry=r)
        self.moderation_failures = Counter("genserve_moderation_failures", "Checks that failed or timed out, by "
                                           "the policy's on_error", [*m, "direction", "on_error"], registry=r)
        self.moderation_chars = Counter("genserve_moderation_chars", "Output characters of moderated text "
                                        "models: checked before release, and released to clients",
                                        [*m, "kind"], registry=r)
        # Per API key, by the name the keys file gives it (never the key): what it used and when it was refused.
        self.key_usage = Counter("genserve_key_usage", "What each API key used: requests, tokens, images, "
                                 "audio_seconds, molecules", ["key_name", "unit"], registry=r)
        self.key_rate_limited = Counter("genserve_key_rate_limited", "Requests refused by a key's rate limit "
                                        "(per_minute) or quota (per_day)", ["key_name", "unit", "period"],
                                        registry=r)
        # Ray Serve (genserve serve --ray): calls run again after their replica died, by when they were cut
        # ("call": a unary call or a stream before its first event; "stream": after it, run again by serving).
        self.replica_retries = Counter("genserve_replica_retries", "Requests run again because the replica "
                                       "serving them died", [*m, "when"], registry=r)
        self.model_ready = Gauge("genserve_model_ready", "1 when the model is loaded and serving", m,
                                 registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_shared(self) -> bytes:
        """``render`` in a worker thread (then ``gather``, if set), one at a time: scrapes that arrive while
        a render runs share its result, so any number of scrapers costs the event loop nothing and the CPU
        one render."""
        if self._rendering is None or self._rendering.done():
            self._rendering = asyncio.ensure_future(self._render_all())
        return await asyncio.shield(self._rendering)

    async def _render_all(self) -> bytes:
        own = await asyncio.to_thread(self.render)
        return own if self.gather is None else await self.gather(own)


class _Families:
    """A collector that yields families already built (``merge_exposition``'s)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_exposition(parts: Iterable[tuple[dict[str, str], str]]) -> bytes:
    """Several registries' Prometheus text as one exposition: each part's samples with its labels added
    (a replica's ``deployment`` and ``replica``, as Ray's own series name them), and the families of one
    name merged into one (the text format allows each family once). A part whose family has another type
    under the same name (replicas of two versions during a rolling update) keeps its samples out of it:
    the exposition keeps the first type, and the skip is logged."""
    families: dict[str, Metric] = {}
    for labels, text in parts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            elif merged.type != family.type:
                log.warning("metrics of %s: %s is a %s there and a %s elsewhere; its samples there are left out",
                            labels, family.name, family.type, merged.type)
                continue
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, **labels}, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
