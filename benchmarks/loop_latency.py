"""Trivial-request latency: ``GET /v1/models`` on genserve (with an API key, one text model loaded)
against a bare FastAPI app returning the same JSON, in one run.

Issue 19 (#12) saw genserve's p99 at 241 ms against 37 ms for the bare app: something blocked the
event loop at intervals. The load is ``--connections`` keep-alive connections from one client
process, each sending its next request as soon as the last answer is read, for ``--seconds``;
rounds alternate bare → genserve so that drift hits both alike::

    .venv/bin/python benchmarks/loop_latency.py

The client speaks HTTP/1.1 over raw asyncio streams (no HTTP library in the loop), so what it adds
to each request is small and the same for both servers. The load is closed-loop: each server is
measured at its own rate (genserve's middleware makes it the slower), on 2 cores the client shares,
so p50 and p99 compare the servers at different loads; the longest requests (p99.9, max) are what
shows a stall of the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import (  # noqa: E402
    builtin_entry,
    cpu_name,
    free_port,
    managed_server,
    registry_command,
    server_env,
)

KEY = "bench-key"

BARE_APP = textwrap.dedent("""
    import json, sys
    from fastapi import FastAPI, Response
    body = json.loads(sys.argv[1])
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> Response:  # async, as genserve's: no thread-pool hop
        return Response(json.dumps(body), media_type="application/json")

    @app.get("/health/ready")
    def ready() -> dict:
        return {"ok": True}
""")


async def one_connection(port: int, path: str, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n").encode()
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{path}: {head[:80]!r}")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def load(port: int, connections: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    until = time.perf_counter() + seconds
    await asyncio.gather(*(one_connection(port, "/v1/models", until, latencies) for _ in range(connections)))
    return latencies


def summary(latencies: list[float], seconds: float) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    return {"requests_s": len(ms) / seconds, "p50": statistics.median(ms), "p99": ms[int(len(ms) * 0.99)],
            "p999": ms[int(len(ms) * 0.999)], "max": ms[-1], "n": len(ms)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gport, bport = free_port(), free_port()
        env = server_env(1) | {"GENSERVE_API_KEYS": KEY}
        cmd = registry_command([builtin_entry("genserve-text-tiny")], gport, work)
        with managed_server("genserve", cmd, f"http://127.0.0.1:{gport}/health/ready", env, work / "g.log", 600):
            body = httpx.get(f"http://127.0.0.1:{gport}/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                             timeout=10).json()
            (work / "bare.py").write_text(BARE_APP)
            bare_cmd = [sys.executable, "-c",
                        f"import sys, uvicorn; sys.argv = ['bare', {json.dumps(json.dumps(body))}]; "
                        f"sys.path.insert(0, {str(work)!r}); import bare; "
                        f"uvicorn.run(bare.app, host='127.0.0.1', port={bport}, log_level='warning')"]
            with managed_server("bare", bare_cmd, f"http://127.0.0.1:{bport}/health/ready", dict(os.environ),
                                work / "b.log", 60):
                rows: dict[str, list[dict]] = {"bare FastAPI": [], "genserve": []}
                pooled: dict[str, list[float]] = {"bare FastAPI": [], "genserve": []}
                for _ in range(args.rounds):
                    for name, port in (("bare FastAPI", bport), ("genserve", gport)):
                        got = asyncio.run(load(port, args.connections, args.seconds))
                        rows[name].append(summary(got, args.seconds))
                        pooled[name] += got
    print(f"# loop_latency: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"{args.connections} connections, {args.seconds:.0f} s per round, {args.rounds} rounds\n")
    print("| server | round | requests/s | p50 ms | p99 ms | p99.9 ms | max ms |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, rounds in rows.items():
        for k, r in enumerate(rounds, 1):
            print(f"| {name} | {k} | {r['requests_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | "
                  f"{r['max']:.1f} |")
        r = summary(pooled[name], args.seconds * args.rounds)
        print(f"| {name} | all | {r['requests_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p999']:.2f} | "
              f"{r['max']:.1f} |")
    both = {name: summary(got, 1.0) for name, got in pooled.items()}
    print(f"\ngenserve's p99 / the bare app's p99, every request of every round: "
          f"**{both['genserve']['p99'] / both['bare FastAPI']['p99']:.2f}**")
    for q in ("p99", "max"):
        worst = max(r[q] for r in rows["genserve"]) / max(r[q] for r in rows["bare FastAPI"])
        print(f"\ngenserve's worst {q} / the bare app's worst {q}: **{worst:.2f}**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
