"""What C2PA content credentials cost images and audio: images/s, latency and bytes, signed against
unsigned, in one server.

One ``genserve serve`` holds each model twice: as shipped (``c2pa: true``) and as ``…-plain``
(``c2pa: false``, otherwise the same entry). Rounds alternate signed → plain so that drift hits both
alike. Each request's bytes are those of its decoded files (base64 decoded for images)::

    .venv/bin/python benchmarks/provenance_media.py

- ``genserve-gan``: ``n`` = 16 digits of 32x32 per request, 4 clients (the cheapest image genserve
  makes, so signing's share is the largest);
- ``genserve-diffusion``: one 64x64 image, 10 steps, 4 clients;
- ``genserve-music``: 5 s of WAV, 2 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import builtin_entry, cpu_name, registry_server  # noqa: E402

CASES = {  # model: (path, body, clients, unit per request)
    "genserve-gan": ("/v1/images/generations", {"prompt": "7", "n": 16, "size": "32x32"}, 4, 16),
    "genserve-diffusion": ("/v1/images/generations", {"prompt": "red apple", "size": "64x64",
                                                      "num_inference_steps": 10}, 4, 1),
    "genserve-music": ("/v1/audio/music", {"seconds": 5, "response_format": "wav"}, 2, 1),
}


def file_bytes(r: httpx.Response) -> int:
    if r.headers["content-type"].startswith("application/json"):
        return sum(len(base64.b64decode(d["b64_json"])) for d in r.json()["data"])
    return len(r.content)


async def level(client: httpx.AsyncClient, model: str, requests: int) -> dict:
    path, body, clients, unit = CASES[model.removesuffix("-plain")]
    latencies: list[float] = []
    sizes: list[int] = []

    async def worker(w: int) -> None:
        for i in range(requests):
            t0 = time.perf_counter()
            r = await client.post(path, json={**body, "model": model, "seed": 1000 * w + i})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            sizes.append(file_bytes(r) // unit)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - t0
    return {"per_s": clients * requests * unit / wall, "p50_ms": 1000 * statistics.median(latencies),
            "bytes": statistics.mean(sizes), "wall": wall}


async def bench(url: str, requests: int, rounds: int) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for model in CASES:
            await level(client, model, 1)  # warm both
            await level(client, f"{model}-plain", 1)
            got: dict[str, list[dict]] = {"signed": [], "plain": []}
            for _ in range(rounds):
                got["signed"].append(await level(client, model, requests))
                got["plain"].append(await level(client, f"{model}-plain", requests))
            best = {k: max(v, key=lambda r: r["per_s"]) for k, v in got.items()}
            metrics = ("per_s", "p50_ms", "bytes")
            rows.append({"model": model, **{f"{k}_{m}": best[k][m] for k in best for m in metrics}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6, help="requests per client in each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args(argv)
    entries = []
    for model in CASES:
        entry = builtin_entry(model)
        entries += [entry, {**entry, "id": f"{model}-plain", "c2pa": False}]
    with tempfile.TemporaryDirectory() as tmp, registry_server(entries, Path(tmp), args.threads, 600) as url:
        rows = asyncio.run(bench(url, args.requests, args.rounds))
    print(f"# provenance_media: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"threads {args.threads}, {args.requests} requests per client, best of {args.rounds} rounds\n")
    print("| model | per s, signed | per s, unsigned | signed / unsigned | p50 ms signed / unsigned | "
          "bytes per file signed / unsigned |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['signed_per_s']:.2f} | {r['plain_per_s']:.2f} | "
              f"**{r['signed_per_s'] / r['plain_per_s']:.3f}** | {r['signed_p50_ms']:.0f} / {r['plain_p50_ms']:.0f} | "
              f"{r['signed_bytes']:.0f} / {r['plain_bytes']:.0f} (+{r['signed_bytes'] - r['plain_bytes']:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
