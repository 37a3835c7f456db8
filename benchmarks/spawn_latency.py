"""How long starting a process holds the event loop, in a process as large as a serving one.

genserve's speech runs one espeak-ng process per request (``app/backends/local_audio.py``). asyncio's
``create_subprocess_exec`` on uvloop (what uvicorn runs) forks the server, copying its page tables while
the loop waits; ``subprocess.Popen`` run in a thread starts the process with ``vfork`` and the loop goes
on. This script fills ``--gigabytes`` of memory (a served model's weights and torch) and times, for each
way, how long the loop is held: for uvloop's spawn, the call (libuv forks, and waits for the child's
exec, inside it); for the thread, handing the start over to the thread pool::

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
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import cpu_name  # noqa: E402


async def held_by_loop_spawn() -> float:
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("true", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    held = time.perf_counter() - t
    await proc.wait()
    return held


async def held_by_thread_spawn() -> float:
    t = time.perf_counter()
    started = asyncio.get_running_loop().run_in_executor(
        None, lambda: subprocess.Popen(["true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    held = time.perf_counter() - t  # the loop is free again here; the thread forks
    proc = await started
    proc.communicate()
    return held


async def measure(times: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"uvloop create_subprocess_exec": [], "subprocess.Popen in a thread": []}
    for _ in range(times):
        out["uvloop create_subprocess_exec"].append(await held_by_loop_spawn())
        out["subprocess.Popen in a thread"].append(await held_by_thread_spawn())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gigabytes", type=float, default=2.0, help="memory this process fills first")
    p.add_argument("--times", type=int, default=40)
    args = p.parse_args()
    filled = np.ones(int(args.gigabytes * 2**30 / 4), dtype=np.float32)  # touched: resident, as weights are
    rows = uvloop.run(measure(args.times))
    print(f"# spawn_latency: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"{filled.nbytes / 2**30:.1f} GiB resident, {args.times} starts each, alternating\n")
    print("| how | loop held, median ms | p90 ms | max ms |\n|---|---:|---:|---:|")
    for how, held in rows.items():
        ms = sorted(x * 1e3 for x in held)
        print(f"| {how} | {statistics.median(ms):.2f} | {ms[int(0.9 * len(ms))]:.2f} | {ms[-1]:.2f} |")


if __name__ == "__main__":
    main()
