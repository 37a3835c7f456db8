"""genserve on a real Ray cluster: a head (no CPUs, as KubeRay's) and two worker nodes on loopback, the
application deployed by ``genserve serve --ray ADDRESS`` itself, driven over HTTP with the official SDK.

Replicas are killed with SIGKILL (their processes, as a crash or the OOM killer would), a worker node
by killing its raylet; under load, the count of requests lost must be 0 and every stream must either
complete or end with an error event.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import httpx
import pytest

from tests.conftest import API_KEY, EMBED, ROOT, TEXT, TEXT_DIR, Server, builtin_entry, free_port, sdk, wait_ready

# Ray resolves 127.0.0.1 to the machine's interface, which a sandbox may not dial back (every connection
# to the GCS hangs); off, this switch keeps every node, driver and replica on loopback. Ray reads it when
# imported, so it is set before; the CLI's process inherits it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.timeout(600)
GAN = "genserve-gan"
# Short Ray delays for the autoscaling scenario (the defaults are 30 s up, 600 s down).
EMBED_RAY = ("    ray: {autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 1, "
             "upscale_delay_s: 0.5, downscale_delay_s: 2, look_back_period_s: 1}, num_cpus: 0.5}\n")
# How often replicas and handles report their load to the autoscaler (default 10 s).
for _push in ("REPLICA", "HANDLE"):
    os.environ[f"RAY_SERVE_{_push}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.2"


def registry() -> str:
    text = (f"  - id: {TEXT}\n    modality: text\n    backend: local\n    family: llama\n    source: {TEXT_DIR}\n"
            "    ray: {replicas: 2, num_cpus: 0.5, max_replicas_per_node: 1}\n")
    embed = builtin_entry(EMBED) + EMBED_RAY
    # The GAN's queue is tiny: one request at a time and one waiting, so a burst gets 429s.
    gan = builtin_entry(GAN) + ("    ray: {replicas: 1, num_cpus: 0.5, max_ongoing_requests: 1, "
                                "max_queued_requests: 1}\n")
    return "include_defaults: false\nmodels:\n" + text + embed + gan


SERVER_SET = None  # its server is the application on the cluster below, started early (START_EARLY)
DEPLOYED: dict = {}  # what START_EARLY deployed: its registry file, state directory and port


def START_EARLY(tmp: Path, env: dict[str, str]) -> tuple[tuple[Cluster, Server], Callable[[], None]]:
    """The cluster and the application deployed on it by the CLI, started by the session (conftest's
    ``Early``) while other modules' tests run, and undone in the background after this module.

    Ray's nodes set a SIGTERM handler in the process that starts them, which Python allows only in the
    main thread: they set none here (``no_sigterm_handler``)."""
    with no_sigterm_handler():
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=4)
    proc = None
    try:
        cluster.wait_for_nodes()
        config, log, port = tmp / "registry.yaml", tmp / "ray.log", free_port()
        config.write_text(registry())
        proc = subprocess.Popen(
            [sys.executable, "-m", "genserve", "serve", "--ray", cluster.address, "--port", str(port),
             "--config", str(config)],
            env={**env, "GENSERVE_API_KEYS": API_KEY, "GENSERVE_RAY_PROXY_LOCATION": "HeadOnly",
                 "GENSERVE_RAY_GATEWAY_NUM_CPUS": "0.5", "GENSERVE_STATE_DIR": str(tmp / "state")},
            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        srv = wait_ready(Server(f"http://127.0.0.1:{port}", proc, log), timeout=240)
    except BaseException:
        stop(cluster, proc)
        raise
    DEPLOYED.update(config=config, state=tmp / "state", port=port)
    return (cluster, srv), lambda: stop(cluster, proc)


def no_sigterm_handler():
    """Ray's nodes set a SIGTERM handler in the process that starts them (``sys.exit(1)`` after killing
    the node): in pytest's process, none is set, so pytest's SIGTERM stays pytest's."""
    return mock.patch.object(ray._private.utils, "set_sigterm_handler", lambda handler: None)


def stop(cluster: Cluster, proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(early: tuple[Cluster, Server]) -> Cluster:
    return early[0]


@pytest.fixture(scope="module")
def server(early: tuple[Cluster, Server]) -> Iterator[Server]:
    ray.init(address=early[0].address, logging_level="ERROR")
    yield early[1]
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server: Server):
    return sdk(server.url, timeout=120)


def replica_pids(deployment: str) -> list[int]:
    """The processes of a deployment's replicas, by the title Ray gives them."""
    out = subprocess.run(["pgrep", "-f", f"ray::ServeReplica:genserve:{deployment}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def wait_for(check, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def stream_chat(server: Server, seed: int, max_tokens: int = 40) -> str:
    """One streamed chat: 'complete' when it ends with a finish reason and [DONE], 'error' when it ends
    with an error event; anything else (a stream cut silently) fails the caller's count."""
    body = {"model": TEXT, "messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": max_tokens,
            "seed": seed, "stream": True}
    finished = errored = done = False
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return f"status {resp.status_code}"
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            errored = errored or "error" in event
            finished = finished or any(ch.get("finish_reason") for ch in event.get("choices", []))
    if errored:
        return "error"
    return "complete" if finished and done else "cut"


# the API through Ray ---------------------------------------------------------------------------------
def test_the_sdk_gets_chat_embeddings_and_images_through_ray(server: Server, client) -> None:
    chat = client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, seed=3)
    again = client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, seed=3)
    assert chat.choices[0].message.content and chat.choices[0].message.content == again.choices[0].message.content
    assert chat.usage.completion_tokens == 8
    pieces = list(client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=8, seed=3, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == chat.choices[0].message.content
    emb = client.embeddings.create(model=EMBED, input=["a cat", "a dog"], encoding_format="float")  # strict: floats
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
    img = client.images.generate(model=GAN, prompt="7", n=2, size="32x32")
    from PIL import Image

    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in img.data] == [(32, 32)] * 2
    ready = httpx.get(f"{server.url}/health/ready", timeout=10).json()
    assert ready["models"] == {TEXT: True, EMBED: True, GAN: True}


def test_a_full_queue_gets_429_with_retry_after(server: Server) -> None:
    body = {"model": GAN, "prompt": "3", "n": 8, "size": "32x32"}
    with server.client() as c, ThreadPoolExecutor(12) as pool:
        resps = list(pool.map(lambda _: c.post("/v1/images/generations", json=body), range(12)))
    codes = sorted(r.status_code for r in resps)
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    limited = next(r for r in resps if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"


def text_replica_series(name: str) -> dict[int, float]:
    """``name`` summed over its samples, per text replica (by process id), from the replicas' own
    registries: the handle routes each call to a replica of its choosing, so it asks until it has heard
    from both."""
    from ray import serve

    handle = serve.get_deployment_handle(f"model-{TEXT}", app_name="genserve")
    seen: dict[int, float] = {}
    for _ in range(40):
        pid, text = handle.metrics_text.remote().result(timeout_s=30)
        seen[pid] = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                        if line.startswith((name + "{", name + " ")))
        if len(seen) == 2:
            return seen
    raise AssertionError(f"heard from {len(seen)} text replicas of 2")


def replicas_on_metrics(server: Server, deployment: str) -> set[str]:
    """The replicas of ``deployment`` whose series the gateway's /metrics shows (by Ray's replica id)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {s.labels["replica"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.labels.get("deployment") == deployment}


def test_metrics_show_every_replicas_series(server: Server) -> None:
    """One scrape of the gateway gives genserve's series of every replica, gateway and models, each
    labelled with its deployment and replica; a model replica's counters there are the replica's own."""
    wait_for(lambda: len(replicas_on_metrics(server, f"model-{TEXT}")) == 2, 30, "both text replicas on /metrics")
    for deployment in ("gateway", f"model-{EMBED}", f"model-{GAN}"):
        assert len(replicas_on_metrics(server, deployment)) == 1, deployment
    own = sum(text_replica_series("genserve_generation_tokens_total").values())
    assert own > 0  # the SDK test's chats
    wait_for(lambda: server.metric("genserve_generation_tokens_total", deployment=f"model-{TEXT}") == own, 10,
             "/metrics to show the text replicas' tokens")
    assert server.metric("genserve_generation_tokens_total") == own  # counted once: not by the gateway too
    assert server.metric("genserve_http_requests_total", deployment="gateway") > 0


def test_a_client_that_leaves_stops_its_sequence_inside_the_replica(server: Server) -> None:
    """A stream of 480 tokens, left after its first chunk: the engine inside the replica stops generating
    it (the handle call is cancelled, Ray cancels the replica's task, the backend aborts the sequence)."""
    before = text_replica_series("genserve_generation_tokens_total")
    body = {"model": TEXT, "messages": [{"role": "user", "content": "Tell a long story"}], "max_tokens": 480,
            "seed": 5, "stream": True, "ignore_eos": True}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        next(line for line in resp.iter_lines() if line.startswith("data: "))
    wait_for(lambda: sum(text_replica_series("genserve_num_requests_running").values()) == 0, 30,
             "the replicas to have no sequence running")
    made = sum(text_replica_series("genserve_generation_tokens_total").values()) - sum(before.values())
    assert 0 < made < 240, made  # the stream's tokens up to the leave, not its 480


# nothing lost --------------------------------------------------------------------------------------------
def load(server: Server, stop: threading.Event, results: list, streams: list, embed: bool) -> None:
    """Unary embeddings (if ``embed``) and chats, and streamed chats, in a loop until ``stop``."""
    def unary(i: int) -> None:
        with server.client() as c:
            while not stop.is_set():
                try:
                    if i % 2 and embed:
                        r = c.post("/v1/embeddings", json={"model": EMBED, "input": [f"text {i}"]})
                    else:
                        r = c.post("/v1/chat/completions", json={"model": TEXT, "max_tokens": 60, "seed": i,
                                                                 "messages": [{"role": "user", "content": "Hi"}]})
                    results.append(r.status_code)
                except httpx.HTTPError:  # a connection cut is a loss too
                    results.append(0)

    def streamed(i: int) -> None:
        while not stop.is_set():
            try:
                streams.append(stream_chat(server, i, max_tokens=200))
            except httpx.HTTPError:
                streams.append("cut")

    threads = [threading.Thread(target=unary, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=streamed, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    return threads  # type: ignore[return-value]


def run_load_while(server: Server, action, embed: bool = True) -> tuple[list[int], list[str]]:
    results: list[int] = []
    streams: list[str] = []
    stop = threading.Event()
    threads = load(server, stop, results, streams, embed)
    try:
        time.sleep(2)  # requests in flight everywhere
        action()
        time.sleep(3)  # and served after it
    finally:
        stop.set()  # also when the action failed: the load's threads must not outlive the test
        for t in threads:
            t.join(120)
    return results, streams


def once_busy(pid: int, action) -> None:
    """``action`` once the text replica ``pid`` holds requests: a replica just made may not be in the
    gateway's routing table yet, and a kill of an idle one cuts nothing."""
    wait_for(lambda: text_replica_series("genserve_num_requests_running").get(pid, 0) > 0, 30,
             f"text replica {pid} to hold requests")
    action()


def check_nothing_lost(server: Server, results: list[int], streams: list[str], retried_before: float) -> None:
    assert results and all(code == 200 for code in results), sorted(set(results))
    assert streams and set(streams) <= {"complete", "error"}, streams
    # The kill cut work in flight (else this test proves nothing): calls retried, or streams that had
    # begun and ended with an error event.
    assert server.metric("genserve_replica_retries_total") - retried_before + streams.count("error") > 0


def test_a_replica_killed_under_load_loses_nothing(server: Server) -> None:
    victims = replica_pids(f"model-{TEXT}")
    assert len(victims) == 2
    before = server.metric("genserve_replica_retries_total")
    reporting = replicas_on_metrics(server, f"model-{TEXT}")
    results, streams = run_load_while(server, lambda: once_busy(victims[0],
                                                                lambda: os.kill(victims[0], signal.SIGKILL)))
    check_nothing_lost(server, results, streams, before)
    wait_for(lambda: running(f"model-{TEXT}") == 2, 90, "Ray to replace the killed replica")
    # On /metrics the dead replica's series drop out and its replacement's come in.
    wait_for(lambda: (lambda now: len(now) == 2 and len(now & reporting) == 1)(
        replicas_on_metrics(server, f"model-{TEXT}")), 30, "/metrics to follow the replacement")


def running(deployment: str) -> int:
    """Replicas of ``deployment`` that Serve routes to (a started process may still be loading its model)."""
    from ray import serve

    states = serve.status().applications["genserve"].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def kill_node(cluster: Cluster, node) -> None:
    """A node's death as a machine's: its workers (the replicas) killed with its raylet, at once. (Ray's
    ``remove_node`` kills the raylet; the workers notice later and may finish what they hold first.)"""
    raylet = raylet_pid(node)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent(int(entry.name)) == raylet:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    cluster.remove_node(node, allow_graceful=False)


def test_a_worker_node_removed_under_load_loses_nothing(server: Server, cluster: Cluster) -> None:
    """The node that holds a text replica (one a node: max_replicas_per_node) and not the gateway (a gateway
    replica takes the requests it holds with it: Ray's proxy does not retry them; docs/deploy.md), under a
    text load: the single-replica models on that node have no other replica to go to until Ray makes one."""
    wait_for(lambda: running(f"model-{TEXT}") == 2, 90, "both text replicas serving")  # else the victim's is idle
    gateway_node = parent(replica_pids("gateway")[0])
    text_replicas = {parent(p): p for p in replica_pids(f"model-{TEXT}")}  # by the raylet of their node
    victim = next(n for n in cluster.worker_nodes if raylet_pid(n) in text_replicas.keys() - {gateway_node})
    replica = text_replicas[raylet_pid(victim)]
    before = server.metric("genserve_replica_retries_total")
    try:
        results, streams = run_load_while(server, lambda: once_busy(replica, lambda: kill_node(cluster, victim)),
                                          embed=False)
    finally:
        with no_sigterm_handler():
            cluster.add_node(num_cpus=4)  # the later tests need two worker nodes, whatever happened here
    check_nothing_lost(server, results, streams, before)
    for deployment, count in ((f"model-{TEXT}", 2), (f"model-{EMBED}", 1), (f"model-{GAN}", 1)):
        wait_for(lambda d=deployment, c=count: len(replica_pids(d)) == c, 120, f"Ray to replace {deployment}")


def test_autoscaling_goes_up_under_load_and_back(server: Server) -> None:
    deployment = f"model-{EMBED}"
    wait_for(lambda: len(replica_pids(deployment)) == 1, 60, "one embedding replica")
    stop = threading.Event()
    codes: list[int] = []

    def hammer() -> None:
        with server.client() as c:
            while not stop.is_set():
                codes.append(c.post("/v1/embeddings", json={"model": EMBED, "input": ["a longer text"] * 64})
                             .status_code)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(replica_pids(deployment)) >= 2, 60, "a second embedding replica")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert codes and set(codes) == {200}
    wait_for(lambda: len(replica_pids(deployment)) == 1, 90, "the embedding replicas to scale back to 1")


# Ray's config asks look_back_period_s above the deprecated metrics_interval_s (10 s), which these
# shortened delays are not; it warns only.
@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
def test_a_rolling_update_under_load_has_no_errors(server: Server) -> None:
    """The application deployed again with the text model's entry changed (as ``serve deploy`` of a new
    config): Ray replaces every replica (an application deployed from Python gets a new code version
    each time) while the load goes on. The single-replica deployments stop their replica before its
    replacement starts (Ray's default); the text model's new config surges (``max_surge_percent: 100``),
    so its two replacements start at once beside the old replicas, which serve until they run. (Its
    ``max_replicas_per_node: 1`` goes, or the old replicas, one on each node, would leave no room.)"""
    from ray import serve

    from genserve.app.ray_app import APP_NAME, application
    from genserve.app.registry import load_registry
    from genserve.app.settings import Settings

    settings = Settings(api_keys=[API_KEY], port=DEPLOYED["port"], state_dir=DEPLOYED["state"],
                        ray_proxy_location="HeadOnly", ray_gateway_num_cpus=0.5)
    entries = load_registry(DEPLOYED["config"])
    text = next(e for e in entries if e.id == TEXT)
    text.max_wait_ms = 4.0
    text.ray = text.ray.model_copy(update={"max_surge_percent": 100, "max_replicas_per_node": None})
    deployments = ("gateway", f"model-{TEXT}", f"model-{EMBED}", f"model-{GAN}")
    old = {d: set(replica_pids(d)) for d in deployments}
    # No embeddings in this load: they would scale the autoscaled embedding model up and down during the
    # update, which serve.run waits out (the autoscaling test covers it).
    results, streams = run_load_while(
        server, lambda: serve.run(application(settings, entries), name=APP_NAME, route_prefix="/"), embed=False)
    assert results and all(code == 200 for code in results), sorted(set(results))
    assert streams and set(streams) == {"complete"}, streams
    now = {d: set(replica_pids(d)) for d in deployments}
    for deployment in deployments:
        assert now[deployment] and not old[deployment] & now[deployment], deployment
