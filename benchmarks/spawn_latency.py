"""How long starting a process holds the event loop, in a process as large as a serving one.

genserve's speech runs one espeak-ng process per request (``app/backends/local_audio.py``). asyncio's
``create_subprocess_exec`` on uvloop (what uvicorn runs) forks the server, copying its page tables while
the loop waits; ``subprocess.Popen`` run in a thread starts the process with ``vfork`` and the loop goes
on. This script fills ``--gigabytes`` of memory (a served model's weights and torch) and, while each way
starts ``true`` and waits for it, a ticker task asks the loop for a 1 ms sleep over and over: how late
its worst wake-up is, is how long the loop was held (the thread's Python work under the GIL included;
the GIL switch interval is genserve's 1 ms)::

    .venv/bin/python benchmarks/spawn_latency.py
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import cpu_name  # noqa: E402
from genserve.cli import GIL_SWITCH_INTERVAL_S  # noqa: E402

TICK_S = 0.001


async def loop_spawn() -> None:
    proc = await asyncio.create_subprocess_exec("true", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    await proc.wait()


async def thread_spawn() -> None:
    proc = await asyncio.to_thread(subprocess.Popen, ["true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    await asyncio.to_thread(proc.communicate)


async def worst_lateness(start: Callable[[], Awaitable[None]]) -> float:
    """The latest a 1 ms sleep of another task woke while ``start`` ran, in seconds."""
    done, worst = False, 0.0

    async def ticker() -> None:
        nonlocal worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst = max(worst, time.perf_counter() - t - TICK_S)

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)  # the ticker is running
    worst = 0.0
    await start()
    done = True
    await ticking
    return worst


async def measure(times: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"uvloop create_subprocess_exec": [], "subprocess.Popen in a thread": []}
    for _ in range(times):
        out["uvloop create_subprocess_exec"].append(await worst_lateness(loop_spawn))
        out["subprocess.Popen in a thread"].append(await worst_lateness(thread_spawn))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gigabytes", type=float, default=2.0, help="memory this process fills first")
    p.add_argument("--times", type=int, default=40)
    args = p.parse_args()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    filled = np.ones(int(args.gigabytes * 2**30 / 4), dtype=np.float32)  # touched: resident, as weights are
    rows = uvloop.run(measure(args.times))
    print(f"# spawn_latency: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"{filled.nbytes / 2**30:.1f} GiB resident, {args.times} starts each, alternating\n")
    print("| how | loop held (latest wake of a 1 ms sleep), median ms | p90 ms | max ms |\n|---|---:|---:|---:|")
    for how, held in rows.items():
        ms = sorted(x * 1e3 for x in held)
        print(f"| {how} | {statistics.median(ms):.2f} | {ms[int(0.9 * len(ms))]:.2f} | {ms[-1]:.2f} |")


if __name__ == "__main__":
    main()
