"""genserve as a Ray Serve application: the gateway as the ingress deployment, one deployment per local
model (``genserve serve --ray``, or ``serve build``/``serve deploy``/KubeRay with :func:`build`).

The gateway deployment runs the same FastAPI app as ``genserve serve`` (``create_app``): docs, auth,
limits, moderation, provenance and metrics. Its models that run on Ray (``ModelEntry.runs_on_ray``:
local generation models) are ``RayBackend``s over deployment handles; remote models and moderation
classifiers run inside the gateway as they do in process. Each model's replicas, resources and queue
come from its registry entry's ``ray`` block (``RayOptions``).

Everything the gateway replicas must agree on is decided once, here, where the application is built:
the watermark secret (otherwise each replica's node would make its own, and a text marked by one could
not be verified by another).

Metrics: every replica, gateway or model, keeps its own registry (each is its own process, perhaps on
another node) and pushes it every ``METRICS_PUSH_S`` to the ``metrics`` deployment (``MetricsHub``), so
that the gateway's ``/metrics``, whichever gateway replica answers, shows genserve's series of every
replica, labelled ``deployment`` and ``replica`` as Ray's own ``ray_serve_*`` series are (those are on
each Ray node's metrics port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import SecretStr

from genserve.app.backends.manager import build_backend
from genserve.app.backends.ray_serve import STREAMED, UNARY, ReplicaError
from genserve.app.errors import GenserveError
from genserve.app.metrics import Metrics, merge_exposition
from genserve.app.registry import ConfigError, ModelEntry, load_registry, select
from genserve.app.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "genserve"
GATEWAY = "gateway"
METRICS_HUB = "metrics"
HEALTH_CHECK_PERIOD_S = 5.0
# How often each replica pushes its series to the hub, and how long the hub keeps a replica's after its last
# push (one that stopped, was killed or lost its node drops out of /metrics then).
METRICS_PUSH_S = 2.0
METRICS_EXPIRE_S = 10.0
# How long a scrape waits for the hub (while Ray replaces a lost one, a call would wait for it).
METRICS_HUB_WAIT_S = 2.0


def deployment_name(entry: ModelEntry) -> str:
    """A model's deployment: its id with what Ray's names do not take (``/``, ``:``) replaced."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", entry.id)


def drain_s(settings: Settings, entries: list[ModelEntry]) -> float:
    """How long a replica stopped by a downscale or a rolling update may finish what it holds before Ray
    kills it: up to the deadline of the requests it serves (and at least the shutdown grace)."""
    return max([settings.shutdown_grace_s] + [e.timeout_s(settings.request_timeout_s) for e in entries])


def model_options(entry: ModelEntry, settings: Settings) -> dict[str, Any]:
    """The Ray Serve deployment options of ``entry`` (its ``ray`` block, with the model's own queue
    sizes as defaults)."""
    r = entry.ray
    options: dict[str, Any] = {
        "name": deployment_name(entry),
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests or entry.max_batch_size + entry.max_waiting,
        "max_queued_requests": r.max_queued_requests or entry.max_waiting,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": drain_s(settings, [entry]),
    }
    if r.max_surge_percent:
        options["max_surge_percent"] = r.max_surge_percent
    if r.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = r.max_replicas_per_node
    if r.autoscaling is None:
        options["num_replicas"] = r.replicas
    else:
        a = r.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s}
    return options


def shared_settings(settings: Settings) -> Settings:
    """``settings`` with what every gateway replica must share decided here: the watermark secret."""
    from genserve.app.provenance.keys import watermark_secret

    key = settings.watermark_key
    secret = watermark_secret(key.get_secret_value() if key else None, settings.state_dir)
    return settings.model_copy(update={"watermark_key": SecretStr(secret)})


def application(settings: Settings, entries: list[ModelEntry]) -> Any:
    """The bound Serve application: the gateway over one deployment per model that runs on Ray."""
    from ray import serve

    names = [deployment_name(e) for e in entries if e.runs_on_ray]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise ConfigError(f"two model ids become the Ray deployment name {clash!r}; rename one")
    settings = shared_settings(settings)
    # What a model replica needs of the settings; the keys, the watermark secret and Redis's address stay
    # with the gateway (Serve keeps a deployment's arguments in its GCS store).
    replica_settings = settings.model_copy(update={"api_keys": [], "api_keys_file": None, "watermark_key": None,
                                                   "redis_url": None})
    hub = serve.deployment(name=METRICS_HUB, num_replicas=1, ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=1000, health_check_period_s=HEALTH_CHECK_PERIOD_S)(MetricsHub).bind()
    models = {e.id: serve.deployment(**model_options(e, settings))(ModelReplica).bind(e, replica_settings, hub)
              for e in entries if e.runs_on_ray}
    gateway = serve.deployment(
        name=GATEWAY, num_replicas=settings.ray_gateway_replicas,
        ray_actor_options={"num_cpus": settings.ray_gateway_num_cpus},
        max_ongoing_requests=settings.max_connections,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=drain_s(settings, entries))(serve.ingress()(Gateway))
    return gateway.bind(settings, entries, models, hub)


class MetricsHub:
    """The ``metrics`` deployment (one replica, no CPU): the latest series each replica pushed. If it dies,
    Ray makes another, which the replicas' next pushes fill again."""

    def __init__(self) -> None:
        self._parts: dict[tuple[str, str], tuple[float, dict[str, str], str]] = {}

    async def put(self, labels: dict[str, str], text: str) -> None:
        self._parts[labels["deployment"], labels["replica"]] = (time.monotonic(), labels, text)

    async def snapshot(self, exclude: dict[str, str]) -> list[tuple[dict[str, str], str]]:
        """Every live replica's labels and series, but ``exclude``'s (the asker renders its own afresh)."""
        now = time.monotonic()
        for key in [k for k, (at, _, _) in self._parts.items() if now - at > METRICS_EXPIRE_S]:
            del self._parts[key]
        return [(labels, text) for (at, labels, text) in self._parts.values() if labels != exclude]


class ReplicaMetrics:
    """A replica's side of the hub: pushes its registry every ``METRICS_PUSH_S`` (from a task on the
    replica's event loop, so it is made inside one), and for a gateway gathers the others' on a scrape."""

    def __init__(self, metrics: Metrics, hub: Any) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self.labels = {"deployment": context.deployment, "replica": context.replica_tag}
        self.metrics, self.hub = metrics, hub
        self._task = asyncio.get_running_loop().create_task(self._push())

    async def _ask(self, method: str, *args: Any) -> Any:
        """``method`` of the hub, waited for at most ``METRICS_HUB_WAIT_S`` (while Ray replaces a hub lost
        with its node, a call would wait for the new one); one that takes longer is cancelled."""
        response = getattr(self.hub, method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.shield(response), METRICS_HUB_WAIT_S)
        except BaseException:
            with contextlib.suppress(Exception):
                response.cancel()
            raise

    async def _push(self) -> None:
        while True:
            try:
                text = (await asyncio.to_thread(self.metrics.render)).decode()
                await self._ask("put", self.labels, text)
            except Exception as exc:  # the hub restarting: the next push fills the new one
                log.debug("metrics push failed: %s", str(exc) or type(exc).__name__)
            await asyncio.sleep(METRICS_PUSH_S)

    async def gather(self, own: bytes) -> bytes:
        """``own`` (this replica's series, just rendered) with every other live replica's."""
        try:
            others = await self._ask("snapshot", self.labels)
        except Exception as exc:  # /metrics still answers, with this replica's series alone
            log.warning("the metrics hub did not answer (%s): /metrics shows this replica's series only",
                        str(exc) or type(exc).__name__)
            others = []
        return await asyncio.to_thread(merge_exposition, [(self.labels, own.decode()), *others])

    def close(self) -> None:
        self._task.cancel()


class ModelReplica:
    """One replica of a model's deployment: its local backend, loaded in the constructor (Ray marks the
    replica running once it returns), called by method name."""

    # Ray Serve awaits an async constructor; mypy knows only plain ones.
    async def __init__(self, entry: ModelEntry, settings: Any, hub: Any) -> None:  # type: ignore[misc]
        from genserve.app import logs

        logs.setup(settings.log_level, settings.log_format, quiet=True)
        self.metrics = Metrics()
        self.backend = build_backend(entry, settings, self.metrics)
        await asyncio.to_thread(self.backend.setup)
        await self.backend.start()
        self.metrics.model_ready.labels(entry.id).set(1)  # this replica's; the gateway's says if any answers
        self.reporter = ReplicaMetrics(self.metrics, hub)

    def metrics_text(self) -> tuple[int, str]:
        """This replica's process id and its own genserve series (the engine's running sequences and
        tokens, the batcher's queue), in Prometheus's text format."""
        return os.getpid(), self.metrics.render().decode()

    async def call(self, method: str, *args: Any) -> Any:
        if method not in UNARY:
            raise ValueError(f"not a unary backend method: {method}")
        try:
            if method == "describe":
                return self.backend.describe()
            if method == "collect":  # a stream made whole here: one answer, which a caller may retry
                stream, *rest = args
                if stream not in STREAMED:
                    raise ValueError(f"not a streamed backend method: {stream}")
                return [event async for event in getattr(self.backend, stream)(*rest)]
            result = getattr(self.backend, method)(*args)
            return await result if asyncio.iscoroutine(result) else result
        except GenserveError as exc:
            raise ReplicaError.of(exc) from None

    async def stream(self, method: str, *args: Any) -> AsyncGenerator[Any, None]:
        if method not in STREAMED:
            raise ValueError(f"not a streamed backend method: {method}")
        events = getattr(self.backend, method)(*args)
        try:
            async for event in events:
                yield event
        except GenserveError as exc:
            raise ReplicaError.of(exc) from None
        finally:
            await events.aclose()  # cancelled by Ray when the caller left: the backend stops its work

    async def check_health(self) -> None:
        """Ray's health probe: what the replica depends on (the engine's child process, a stuck batch)."""
        ok = await self.backend.check_ready()
        self.metrics.model_ready.labels(self.backend.entry.id).set(1 if ok else 0)
        if not ok:
            raise RuntimeError(f"model {self.backend.entry.id} is not ready: {self.backend.load_error or 'stalled'}")

    async def __del__(self) -> None:  # Ray calls it even after a failed __init__
        if (reporter := getattr(self, "reporter", None)) is not None:
            reporter.close()
        if (backend := getattr(self, "backend", None)) is not None:
            await backend.close()


class Gateway:
    """The ingress deployment: ``create_app`` over the models' deployment handles (Serve passes each
    bound deployment in ``models`` as its handle). Its health is Ray's default probe (the replica
    answers); its models have their own, and ``/health/ready`` says which are ready."""

    def __init__(self, settings: Settings, entries: list[ModelEntry], models: dict[str, Any], hub: Any) -> None:
        from genserve.app import logs

        logs.setup(settings.log_level, settings.log_format, quiet=True)
        self._args = (settings, entries, models, hub)

    async def __serve_build_asgi_app__(self) -> Any:
        """The app, and its ``/metrics`` gathering every replica's (Ray awaits this on the replica's loop)."""
        from genserve.app.deps import services_of
        from genserve.app.main import create_app

        settings, entries, models, hub = self._args
        app = create_app(settings, entries, handles=models)
        metrics = services_of(app).metrics
        self.reporter = ReplicaMetrics(metrics, hub)
        metrics.gather = self.reporter.gather
        return app

    def __del__(self) -> None:
        if hasattr(self, "reporter"):
            self.reporter.close()



def build(args: dict[str, str]) -> Any:
    """The application builder that a Serve config's ``import_path`` names (``deploy/ray/serve.yaml``, for
    ``serve deploy`` and KubeRay's RayService): settings from ``GENSERVE_*`` in the environment, and
    ``args`` may name ``config`` (a registry file) and ``models`` (comma-separated ids)."""
    from genserve.app.tenancy import serving_keys

    unknown = sorted(set(args) - {"config", "models"})
    if unknown:
        raise ConfigError(f"genserve.app.ray_app:build takes the args config and models, not {', '.join(unknown)}")
    overrides: dict[str, Any] = dict(args)
    settings = Settings(**overrides)
    serving_keys(settings, public=True)  # Ray's proxies bind the config's http_options (0.0.0.0 by default)
    entries = load_registry(settings.config)
    if settings.models:
        entries = select(entries, settings.models, "models")
    return application(settings, entries)


def local_cluster_cpus(entries: list[ModelEntry], settings: Settings) -> int:
    """Logical CPUs for ``--ray local``: what the deployments reserve, at least the machine's cores (Ray would
    otherwise leave replicas pending on a small machine that serves many small models)."""
    need = settings.ray_gateway_num_cpus * settings.ray_gateway_replicas
    for e in entries:
        if e.runs_on_ray:
            a = e.ray.autoscaling
            count = e.ray.replicas if a is None else max(a.min_replicas, a.initial_replicas or 0, 1)
            need += e.ray.num_cpus * count
    return max(os.cpu_count() or 1, math.ceil(need))


def run(settings: Settings, entries: list[ModelEntry], address: str) -> int:
    """``genserve serve --ray ADDRESS``: deploys the application on a new local cluster (``local``), the
    cluster this machine belongs to (``auto``), or the one at ADDRESS; serves until SIGTERM or Ctrl-C,
    then deletes the application (and stops the local cluster)."""
    import ray
    from ray import serve

    if address == "local":
        cpus = local_cluster_cpus(entries, settings)
        if cpus > (os.cpu_count() or 1):
            log.warning("the deployments reserve %d CPUs; this machine has %d cores, so the local cluster "
                        "declares %d logical CPUs (set each model's ray.num_cpus to what it needs)",
                        cpus, os.cpu_count() or 1, cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    stop = threading.Event()

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # while deploying: serve.run waits for replicas that may never come

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port},
                    proxy_location=settings.ray_proxy_location)
        serve.run(application(settings, entries), name=APP_NAME, route_prefix="/")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        log.info("genserve is deployed on Ray Serve at %s (application %r)", settings.base_url(), APP_NAME)
        stop.wait()
    except KeyboardInterrupt:
        log.info("interrupted while deploying")
    finally:
        log.info("stopping: deleting the application")
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if address == "local":
            with contextlib.suppress(Exception):
                serve.shutdown()
        ray.shutdown()
    return 0

