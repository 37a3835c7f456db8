"""A bounded mixed load with hostile requests beside it (issue 19): does anything get lost, does anything
get a 5xx, and does the event loop stay responsive?

One genserve (text, embeddings, molecules, diffusion, speech and the moderation classifier, each with
its shipped registry settings) serves, for ``--seconds``:

- streamed chats (``--chats`` at a time), embeddings, streamed diffusion images, speech, molecule
  generations, each a closed loop (the next request once the last has ended);
- hostile requests: the longest SMILES accepted and one past the caps, a 16 MB header (sent on a raw
  socket), and 8 clients scraping ``/metrics`` back to back;
- a prober asking ``/health/live`` every 50 ms, from a process of its own, and after each answer the same of
  a control: a bare FastAPI app in a process of its own on the same machine, serving nothing else.

For each kind it counts 200s, 429s (the queue full: allowed, with ``Retry-After``), other 4xx, 5xx (must
be 0; a stream that ends with an error event counts here) and lost (a connection cut, a timeout, or a
stream that ended without its finish and, for chats, ``[DONE]``: must be 0); and the prober's
p50/p99/max of genserve (the target is p99 < 100 ms) and of the control (what waiting for a core costs on
this machine)::

    .venv/bin/python benchmarks/mixed_load.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import cpu_name, free_port, managed_server, server_env  # noqa: E402

KEY = "bench-key"
MODELS = ["genserve-text-tiny", "all-minilm-l6-v2", "genserve-mol", "genserve-diffusion", "genserve-speech",
          "genserve-moderation"]
HEADERS = {"Authorization": f"Bearer {KEY}"}
LONGEST_SMILES = "C" * 200  # the atom cap (models/molecule/chem.py): accepted
PAST_THE_CAPS = "C" * 20000  # the crash: refused with a 400 before RDKit sees it
BIG_HEADER_BYTES = 16 << 20

Outcome = str  # "200", "429", "4xx", "5xx" or "lost"


def outcome_of(status: int) -> Outcome:
    if status == 200 or status == 429:
        return str(status)
    return "5xx" if status >= 500 else "4xx"


async def streamed(client: httpx.AsyncClient, path: str, body: dict, done: Callable[[dict], bool]) -> Outcome:
    """A streamed request: '200' only when it ends as it should (``done`` saw its last event, and for a
    chat ``[DONE]`` after it); '5xx' when it ends with an error event (the server failed it, in the
    open); 'lost' when it was cut without either."""
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return outcome_of(resp.status_code)
        finished = errored = False
        ended = not path.endswith("/chat/completions")  # chats end with [DONE]; image streams need not
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                ended = True
                continue
            event = json.loads(data)
            errored = errored or "error" in event
            finished = finished or done(event)
        return "5xx" if errored else ("200" if finished and ended else "lost")


def chat_done(event: dict) -> bool:
    return any(c.get("finish_reason") for c in event.get("choices", []))


async def chat(client: httpx.AsyncClient, i: int) -> Outcome:
    body = {"model": "genserve-text-tiny", "messages": [{"role": "user", "content": "Tell a story"}],
            "max_tokens": 64, "stream": True, "seed": i}
    return await streamed(client, "/v1/chat/completions", body, chat_done)


async def image(client: httpx.AsyncClient, i: int) -> Outcome:
    body = {"model": "genserve-diffusion", "prompt": "a red apple", "num_inference_steps": 8, "seed": i,
            "stream": True}
    return await streamed(client, "/v1/images/generations", body,
                          lambda e: e.get("type") == "image_generation.completed")


async def unary(client: httpx.AsyncClient, path: str, body: dict) -> Outcome:
    resp = await client.post(path, json=body)
    return outcome_of(resp.status_code)


async def embeddings(client: httpx.AsyncClient, i: int) -> Outcome:
    texts = [f"text {i} {k}" for k in range(8)]
    return await unary(client, "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": texts})


async def speech(client: httpx.AsyncClient, i: int) -> Outcome:
    return await unary(client, "/v1/audio/speech", {"model": "genserve-speech", "input": f"Request number {i}.",
                                                    "voice": "alloy", "response_format": "wav"})


async def molecules(client: httpx.AsyncClient, i: int) -> Outcome:
    return await unary(client, "/v1/molecules/generations", {"model": "genserve-mol", "n": 8, "seed": i})


async def smiles_accepted(client: httpx.AsyncClient, i: int) -> Outcome:
    body = {"smiles": [LONGEST_SMILES], "include": ["properties", "alerts"]}
    return await unary(client, "/v1/molecules/properties", body)


async def smiles_refused(client: httpx.AsyncClient, i: int) -> Outcome:
    """Past the caps: a 400 is the right answer, so it counts as '200' here (answered as it should)."""
    resp = await client.post("/v1/molecules/properties", json={"smiles": [PAST_THE_CAPS]})
    return "200" if resp.status_code == 400 else outcome_of(resp.status_code)


async def metrics_scrape(client: httpx.AsyncClient, i: int) -> Outcome:
    return outcome_of((await client.get("/metrics")).status_code)


async def big_header(port: int) -> Outcome:
    """16 MB of header on a raw socket: the server must refuse it (431, or close the connection once it
    has read its limit), not buffer it. '200' when refused so."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        try:
            for _ in range(BIG_HEADER_BYTES >> 20):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
            writer.write(b"\r\n\r\n")
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # closed on us mid-header: refused
        try:
            head = await asyncio.wait_for(reader.read(64), 10)
        except (ConnectionError, TimeoutError):
            return "200"
        return "200" if not head or head.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")) else "4xx"
    finally:
        writer.close()


async def loop(kind: str, call: Callable[[int], Awaitable[Outcome]], until: float,
               counts: dict[str, Counter]) -> None:
    i = 0
    while time.monotonic() < until:
        try:
            counts[kind][await call(i)] += 1
        except (httpx.HTTPError, ConnectionError, TimeoutError, json.JSONDecodeError):
            counts[kind]["lost"] += 1
        i += 1


# The prober runs in a process of its own, so that the load's client (this process's event loop, busy with
# the streams and scrapers) does not delay its timings. After each genserve probe it asks a control: a bare
# uvicorn app in a process of its own, which shares the machine but serves nothing else. What the control
# waits is the machine's part (the prober and a server waiting for a core), not genserve's.
PROBE = """
import json, sys, time, httpx
url, control, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
out, until = {"genserve": [], "control": []}, time.monotonic() + seconds
with httpx.Client(timeout=30) as client:
    while time.monotonic() < until:
        for name, base in (("genserve", url), ("control", control)):
            t0 = time.perf_counter()
            status = client.get(base + "/health/live").status_code
            out[name].append(time.perf_counter() - t0 if status == 200 else -status)
        time.sleep(0.05)
print(json.dumps(out))
"""

CONTROL_APP = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI()

@app.get("/health/live")
async def live() -> dict:
    return {"status": "ok"}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


async def probe_live(url: str, control: str, seconds: float, latencies: dict[str, list[float]]) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE, url, control, str(seconds),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    for name, found in json.loads(out).items():
        if any(x < 0 for x in found):
            raise RuntimeError(f"{name}'s /health/live answered {sorted({-int(x) for x in found if x < 0})}")
        latencies[name] = found


async def run_load(url: str, port: int, control: str, seconds: float, chats: int,
                   without: frozenset[str] = frozenset()) -> tuple[dict[str, Counter], dict[str, list[float]]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = {}
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=120, limits=limits) as client:
        kinds: list[tuple[str, int, Callable[[int], Awaitable[Outcome]]]] = [
            ("chat (streamed)", chats, lambda i: chat(client, i)),
            ("embeddings", 2, lambda i: embeddings(client, i)),
            ("image (streamed diffusion)", 1, lambda i: image(client, i)),
            ("speech", 1, lambda i: speech(client, i)),
            ("molecules", 1, lambda i: molecules(client, i)),
            ("hostile: longest SMILES", 1, lambda i: smiles_accepted(client, i)),
            ("hostile: SMILES past the caps", 1, lambda i: smiles_refused(client, i)),
            ("hostile: 16 MB header", 1, lambda i: big_header(port)),
            ("hostile: /metrics scraper", 8, lambda i: metrics_scrape(client, i)),
        ]
        tasks = [loop(kind, call, until, counts) for kind, clients, call in kinds
                 if not any(w in kind for w in without) for _ in range(clients)]
        await asyncio.gather(*tasks, probe_live(url, control, seconds, latencies))
    return counts, latencies


def report(counts: dict[str, Counter], latencies: dict[str, list[float]], args: argparse.Namespace) -> str:
    rows = ["| kind | 200 | 429 | other 4xx | 5xx | lost |", "|---|---:|---:|---:|---:|---:|"]
    for kind in sorted(counts):
        c = counts[kind]
        rows.append(f"| {kind} | {c['200']} | {c['429']} | {c['4xx']} | {c['5xx']} | {c['lost']} |")
    live = ["| `/health/live` of | probes | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for name, found in latencies.items():
        ms = sorted(x * 1e3 for x in found)
        p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        live.append(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p99:.1f} | {ms[-1]:.1f} |")
    live.append("\n(target: genserve's p99 < 100 ms; the control is a bare app on the same machine)")
    total5, lost = sum(c["5xx"] for c in counts.values()), sum(c["lost"] for c in counts.values())
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"{when}, {cpu_name()}, {os.cpu_count()} cores, {args.seconds:g} s, {args.chats} chat streams: "
            f"5xx {total5}, lost {lost}")
    return "\n".join([head, "", *rows, "", *live])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--chats", type=int, default=4, help="streamed chats at a time")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--without", default="", help="comma-separated words: leave out the kinds whose name has one "
                   "(to find what slows the loop), e.g. image,scraper")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(args.threads) | {"GENSERVE_API_KEYS": KEY}
    cmd = [sys.executable, "-m", "genserve", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--models", ",".join(MODELS), "--log-level", "warning"]
    control_port = free_port()
    control = f"http://127.0.0.1:{control_port}"
    with tempfile.TemporaryDirectory() as tmp, \
            managed_server("genserve", cmd, f"{url}/health/ready", env, Path(tmp) / "server.log", 300), \
            managed_server("control", [sys.executable, "-c", CONTROL_APP, str(control_port)],
                           f"{control}/health/live", dict(os.environ), Path(tmp) / "control.log", 60):
        without = frozenset(w for w in args.without.split(",") if w)
        counts, latencies = asyncio.run(run_load(url, port, control, args.seconds, args.chats, without))
    print(report(counts, latencies, args))


if __name__ == "__main__":
    main()
