"""What provenance costs images and audio: images/s, latency and bytes with C2PA content credentials
and the image watermark against neither, in one server.

One ``genserve serve`` holds each model twice: as shipped (``c2pa: true``, ``watermark: true``) and
as ``…-plain`` (both off, otherwise the same entry). Rounds alternate marked → plain so that drift
hits both alike. Each request's bytes are those of its decoded files (base64 decoded for images)::

    .venv/bin/python benchmarks/provenance_media.py

- ``genserve-gan``: ``n`` = 16 digits of 32x32 per request, 4 clients (the cheapest image genserve
  makes, so signing's share is the largest);
- ``genserve-diffusion``: one 64x64 image, 10 steps, 4 clients (signed; too small for the watermark);
- ``genserve-diffusion`` at 256x256: one image, 10 steps, 32 clients (signed and watermarked);
- ``genserve-music``: 5 s of WAV, 2 clients;
- ``genserve-text-tiny``: 32 streams of 64 sampled tokens (T 0.8), output tokens/s, watermarked or not.
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

CASES = {  # label: (model, path, body, clients, unit per request)
    "genserve-gan": ("genserve-gan", "/v1/images/generations", {"prompt": "7", "n": 16, "size": "32x32"}, 4, 16),
    "genserve-diffusion": ("genserve-diffusion", "/v1/images/generations",
                           {"prompt": "red apple", "size": "64x64", "num_inference_steps": 10}, 4, 1),
    "genserve-diffusion 256x256": ("genserve-diffusion", "/v1/images/generations",
                                   {"prompt": "red apple", "size": "256x256", "num_inference_steps": 10}, 32, 1),
    "genserve-music": ("genserve-music", "/v1/audio/music", {"seconds": 5, "response_format": "wav"}, 2, 1),
    # text: output tokens/s of 32 streams, watermarked (sampled at T 0.8) against not
    "genserve-text-tiny": ("genserve-text-tiny", "/v1/completions",
                           {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0.8, "ignore_eos": True,
                            "stream": True}, 32, 64),
}


def file_bytes(r: httpx.Response) -> int:
    if r.headers["content-type"].startswith("application/json"):
        return sum(len(base64.b64decode(d["b64_json"])) for d in r.json()["data"])
    return len(r.content)


async def level(client: httpx.AsyncClient, label: str, plain: bool, requests: int) -> dict:
    model, path, body, clients, unit = CASES[label]
    model = f"{model}-plain" if plain else model
    latencies: list[float] = []
    sizes: list[int] = []

    async def worker(w: int) -> None:
        for i in range(requests):
            t0 = time.perf_counter()
            if body.get("stream"):  # text: every token read as it comes
                async with client.stream("POST", path, json={**body, "model": model, "seed": 1000 * w + i}) as r:
                    r.raise_for_status()
                    size = sum([len(chunk) async for chunk in r.aiter_bytes()])
                sizes.append(size // unit)
            else:
                r = await client.post(path, json={**body, "model": model, "seed": 1000 * w + i})
                r.raise_for_status()
                sizes.append(file_bytes(r) // unit)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    wall = time.perf_counter() - t0
    return {"per_s": clients * requests * unit / wall, "p50_ms": 1000 * statistics.median(latencies),
            "bytes": statistics.mean(sizes), "wall": wall}


async def bench(url: str, requests: int, rounds: int) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for label in CASES:
            await level(client, label, False, 1)  # warm both
            await level(client, label, True, 1)
            got: dict[str, list[dict]] = {"signed": [], "plain": []}
            for _ in range(rounds):
                got["signed"].append(await level(client, label, False, requests))
                got["plain"].append(await level(client, label, True, requests))
            best = {k: max(v, key=lambda r: r["per_s"]) for k, v in got.items()}
            metrics = ("per_s", "p50_ms", "bytes")
            rows.append({"model": label, **{f"{k}_{m}": best[k][m] for k in best for m in metrics}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6, help="requests per client in each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args(argv)
    entries = []
    for model in dict.fromkeys(c[0] for c in CASES.values()):
        entry = builtin_entry(model)
        entries += [entry, {**entry, "id": f"{model}-plain", "c2pa": False, "watermark": False}]
    with tempfile.TemporaryDirectory() as tmp, registry_server(entries, Path(tmp), args.threads, 600) as url:
        rows = asyncio.run(bench(url, args.requests, args.rounds))
    print(f"# provenance_media: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"threads {args.threads}, {args.requests} requests per client, best of {args.rounds} rounds\n")
    print("| model | per s, marked | per s, plain | marked / plain | p50 ms marked / plain | "
          "bytes per file (text: SSE bytes per token) marked / plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['signed_per_s']:.2f} | {r['plain_per_s']:.2f} | "
              f"**{r['signed_per_s'] / r['plain_per_s']:.3f}** | {r['signed_p50_ms']:.0f} / {r['plain_p50_ms']:.0f} | "
              f"{r['signed_bytes']:.0f} / {r['plain_bytes']:.0f} (+{r['signed_bytes'] - r['plain_bytes']:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
