"""Images per second from ``POST /v1/images/generations`` on the embedded diffusion model, with and
without dynamic batching.

One ``genserve serve`` holds the same model directory twice: as shipped (``max_batch_size`` 8, so
concurrent requests share denoising steps) and as ``unbatched`` (``max_batch_size`` 1: the same
requests queue and run one at a time). For each concurrency ``c`` in ``--concurrency`` (default 1,
4, 8), ``c`` clients each send ``--rounds`` requests of one image (distinct seeds, the same
steps and scheduler), and images/s is counted at the clients. The last column is batched over
unbatched at the same concurrency::

    .venv/bin/python benchmarks/image_serving.py
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import builtin_entry, cpu_name, registry_server  # noqa: E402

MODEL = "genserve-diffusion"
PROMPTS = ("red apple", "rocket", "cat face", "grinning face", "red heart", "sun", "pizza", "dog face")


async def run_level(client: httpx.AsyncClient, model: str, concurrency: int, rounds: int, steps: int) -> float:
    """Images per second for ``concurrency`` clients sending ``rounds`` one-image requests each."""
    async def worker(w: int) -> None:
        for r in range(rounds):
            resp = await client.post("/v1/images/generations", json={
                "model": model, "prompt": PROMPTS[(w + r) % len(PROMPTS)], "seed": 1000 * w + r,
                "num_inference_steps": steps})
            resp.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return concurrency * rounds / (time.perf_counter() - start)


async def bench(url: str, levels: list[int], rounds: int, steps: int) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for model in (MODEL, "unbatched"):  # warm-up: first calls allocate
            await run_level(client, model, 1, 1, steps)
        for c in levels:
            batched = await run_level(client, MODEL, c, rounds, steps)
            unbatched = await run_level(client, "unbatched", c, rounds, steps)
            rows.append({"concurrency": c, "batched": batched, "unbatched": unbatched})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--steps", type=int, default=25, help="num_inference_steps of every request")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--model-dir", type=Path, help="a diffusers pipeline directory to serve instead of the "
                        "embedded genserve-diffusion")
    args = parser.parse_args(argv)
    entry = builtin_entry(MODEL)  # as shipped: max_batch_size 8
    if args.model_dir is not None:
        entry["source"] = str(args.model_dir)
    entries = [entry, {**entry, "id": "unbatched", "max_batch_size": 1}]
    with tempfile.TemporaryDirectory() as tmp, registry_server(entries, Path(tmp), args.threads, 600) as url:
        rows = asyncio.run(bench(url, args.concurrency, args.rounds, args.steps))
    print(f"# image_serving: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"threads {args.threads}, {args.steps} steps, {args.rounds} requests per client\n")
    print("| concurrent requests | batched images/s | unbatched images/s | batched / unbatched |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['batched']:.2f} | {r['unbatched']:.2f} | "
              f"**{r['batched'] / r['unbatched']:.2f}×** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
