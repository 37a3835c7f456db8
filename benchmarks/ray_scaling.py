"""genserve on Ray Serve: throughput and latency against 1, 2 and 4 replicas of the embedding model and of
the text model, and the requests lost when a replica or a worker node dies under load, with the
gateway's retry and without it (``GENSERVE_RAY_RETRY=0``), all in one run on one local cluster.

The cluster is real: a head without CPUs and two worker nodes of ``--node-cpus`` logical CPUs each, on
loopback (``ray.cluster_utils.Cluster``). For each replica count the application is deployed again
(``serve.run`` of ``genserve.app.ray_app.application``) and ``--clients`` clients send requests back to
back for ``--seconds``:

- embeddings: ``POST /v1/embeddings`` with 16 short texts each;
- text: non-streamed ``POST /v1/chat/completions`` of 32 tokens, greedy.

Scaling efficiency = throughput(R) / (R x throughput(1)). On a machine with fewer cores than replicas
the replicas share the cores, so efficiency falls with R: the table shows what this machine has, not
Ray's overhead alone.

Faults, at 2 text replicas one per node (``max_replicas_per_node: 1``): unary chats and streamed chats
(200 tokens) run for 8 s; at 3 s one text replica's process is killed (SIGKILL), or the worker node
holding a text replica and not the gateway is removed (then a new node joins); ``--faults`` times each.
Lost = responses that are not 200, plus streams cut without an error event; "errored" = streams
that ended with an SSE error event (explicit, not silent).

    .venv/bin/python benchmarks/ray_scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (tests/e2e/test_ray.py says why)

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
TEXT, EMBED = "genserve-text-tiny", "all-minilm-l6-v2"
KEY = "bench-key"


def registry(replicas: int, spread: bool) -> list[dict]:
    builtin = {e["id"]: e for e in yaml.safe_load((REPO / "src/genserve/models/registry.yaml").read_text())["models"]}
    out = []
    for mid in (TEXT, EMBED):
        e = dict(builtin[mid])
        if not e["source"].startswith("package:"):
            e["source"] = str(REPO / "src/genserve/models" / e["source"])
        e["ray"] = {"replicas": replicas, "num_cpus": 0.5}
        if spread:  # one text replica a node, so that a node's loss is one replica's
            e["ray"]["max_replicas_per_node"] = 1
        out.append(e)
    return out


def deploy(replicas: int, port: int, tmp: Path, retry: bool = True, spread: bool = False) -> None:
    from ray import serve

    from genserve.app.ray_app import APP_NAME, application
    from genserve.app.registry import load_registry
    from genserve.app.settings import Settings

    path = tmp / f"registry-{replicas}.yaml"
    path.write_text(yaml.safe_dump({"include_defaults": False, "models": registry(replicas, spread)}))
    settings = Settings(api_keys=[KEY], port=port, state_dir=tmp / "state", ray_proxy_location="HeadOnly",
                        ray_gateway_num_cpus=0.5, ray_retry=retry, moderation={"enabled": False})
    serve.run(application(settings, load_registry(path)), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}/health/ready"
    while httpx.get(url, timeout=5).status_code != 200:
        time.sleep(0.5)


def closed_loop(url: str, path: str, body: dict, clients: int, seconds: float) -> dict:
    """``clients`` clients sending back to back for ``seconds``: requests/s and latency percentiles."""
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            while time.monotonic() < end:
                t = time.monotonic()
                r = c.post(path, json=body)
                if r.status_code == 200:
                    latencies.append(time.monotonic() - t)
                else:
                    errors += 1

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    lat = sorted(latencies)
    return {"rps": len(lat) / seconds, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": errors}


def stream_outcome(c: httpx.Client, seed: int) -> str:
    body = {"model": TEXT, "messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": 200,
            "seed": seed, "stream": True}
    finished = errored = done = False
    with c.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return "lost"
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                errored = errored or "error" in event
                finished = finished or any(ch.get("finish_reason") for ch in event.get("choices", []))
    return "errored" if errored else "complete" if finished and done else "lost"


def under_fault(url: str, fault) -> dict:
    stop = threading.Event()
    unary: list[int] = []
    streams: list[str] = []

    def unary_client(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            while not stop.is_set():
                try:
                    unary.append(c.post("/v1/chat/completions", json={
                        "model": TEXT, "max_tokens": 60, "seed": i,
                        "messages": [{"role": "user", "content": "Hi"}]}).status_code)
                except httpx.HTTPError:  # a connection cut is a loss too
                    unary.append(0)

    def stream_client(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            while not stop.is_set():
                try:
                    streams.append(stream_outcome(c, i))
                except httpx.HTTPError:
                    streams.append("lost")

    threads = [threading.Thread(target=unary_client, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=stream_client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    fault()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(120)
    return {"requests": len(unary) + len(streams), "lost": sum(c != 200 for c in unary) + streams.count("lost"),
            "errored": streams.count("errored")}


def summed(runs: list[dict]) -> dict:
    return {k: sum(r[k] for r in runs) for k in runs[0]} | {"faults": len(runs)}


def wait_replicas(count: int) -> None:
    while len(pids(f"model-{TEXT}")) < count:
        time.sleep(0.5)


def pids(deployment: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ray::ServeReplica:genserve:{deployment}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--node-cpus", type=int, default=4)
    ap.add_argument("--faults", type=int, default=3, help="kills of each kind, summed, per retry setting")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=args.node_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or
                     platform.machine(), "cores": os.cpu_count(), "scaling": [], "faults": []}
    try:
        for r in args.replicas:
            deploy(r, port, tmp)
            emb = closed_loop(url, "/v1/embeddings", {"model": EMBED, "input": ["a short text to embed"] * 16},
                              args.clients, args.seconds)
            txt = closed_loop(url, "/v1/chat/completions", {"model": TEXT, "max_tokens": 32, "temperature": 0,
                              "messages": [{"role": "user", "content": "Hello"}]}, args.clients, args.seconds)
            results["scaling"].append({"replicas": r, "embeddings": emb, "text": txt})
            print(f"replicas {r}: embeddings {emb}, text {txt}", flush=True)
        for retry in (True, False):
            deploy(2, port, tmp, retry=retry, spread=True)
            kills, nodes = [], []
            for _ in range(args.faults):
                kills.append(under_fault(url, lambda: os.kill(pids(f"model-{TEXT}")[0], signal.SIGKILL)))
                wait_replicas(2)
                gateway_node = parent(pids("gateway")[0])
                text_nodes = {parent(p) for p in pids(f"model-{TEXT}")}
                victim = next(n for n in cluster.worker_nodes
                              if n.all_processes["raylet"][0].process.pid in text_nodes - {gateway_node})
                nodes.append(under_fault(url, lambda v=victim: cluster.remove_node(v, allow_graceful=False)))
                cluster.add_node(num_cpus=args.node_cpus)
                wait_replicas(2)
            row = {"retry": retry, "replica_kill": summed(kills), "node_kill": summed(nodes)}
            results["faults"].append(row)
            print(f"retry {retry}: {row}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(res: dict) -> None:
    base = res["scaling"][0]
    print(f"\n{res['date']}, {res['cores']} cores ({res['machine']})\n")
    print("| replicas | embeddings req/s | p50 ms | p99 ms | efficiency | text req/s | p50 ms | p99 ms | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in res["scaling"]:
        r, e, t = row["replicas"], row["embeddings"], row["text"]
        eff_e = e["rps"] / (r * base["embeddings"]["rps"] / base["replicas"])
        eff_t = t["rps"] / (r * base["text"]["rps"] / base["replicas"])
        print(f"| {r} | {e['rps']:.1f} | {e['p50_ms']:.0f} | {e['p99_ms']:.0f} | {eff_e:.2f} | "
              f"{t['rps']:.1f} | {t['p50_ms']:.0f} | {t['p99_ms']:.0f} | {eff_t:.2f} |")
    print("\n| retry | fault | kills | requests | lost | streams ended with an error event |")
    print("|---|---|---|---|---|---|")
    for row in res["faults"]:
        for fault in ("replica_kill", "node_kill"):
            f = row[fault]
            print(f"| {'on' if row['retry'] else 'off'} | {fault.replace('_', ' ')} | {f['faults']} | "
                  f"{f['requests']} | {f['lost']} | {f['errored']} |")


if __name__ == "__main__":
    sys.exit(main())
