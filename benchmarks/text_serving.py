"""Text serving benchmark in the spirit of ``vllm bench serve``.

Streams ``POST /v1/completions`` requests at a sweep of concurrencies against OpenAI-compatible
servers and prints request throughput, output tokens/s, time to first token (TTFT), time per
output token (TPOT) and inter-token latency (ITL) as one markdown table. Baselines run in the same
invocation, on the same model directory and the same prompts:

- ``--serve genserve``: ``genserve serve`` started here on a free loopback port;
- ``--serve transformers``: ``transformers serve --continuous-batching`` started here likewise;
- ``--sequential-generate``: ``model.generate`` in this process, one prompt after another;
- ``--target NAME=URL``: any server already running (vLLM, a remote genserve, ...).

With no target arguments it runs the whole comparison on ``src/genserve/models/weights/genserve-text-tiny``::

    .venv/bin/python benchmarks/text_serving.py --json /tmp/text_serving.json

Every request asks for exactly ``--max-tokens`` tokens with end-of-sequence ignored, greedy; the
output tokens counted are the server's own ``usage.completion_tokens`` (content chunks when a
server sends no usage), so a server that stops early is not credited for tokens it did not make.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO / "src" / "genserve" / "models" / "weights" / "genserve-text-tiny"
# The built-in registry entry whose settings the managed genserve serves the model directory with.
GENSERVE_ENTRY = "genserve-text-tiny"
# float32 as genserve computes on CPU ("auto" would keep the checkpoint's bfloat16). Without
# --cb-num-blocks, transformers sizes its paged KV cache from free *system* memory on CPU: gigabytes,
# allocated on the first request, and slower decoding while they are touched. 64 pages of the
# default 256 tokens hold every stream of the sweep (one page each at up to 256 tokens).
TRANSFORMERS_FLAGS = "--cb-num-blocks 64"


class BenchError(RuntimeError):
    """A target that cannot be measured: it did not start, or its warm-up failed."""


@dataclass
class Target:
    """One OpenAI-compatible server: where it is, which model to ask for, what extra body fields make
    it ignore end-of-sequence (each server spells that differently)."""

    name: str
    base_url: str
    model: str
    extra_body: dict[str, object] = field(default_factory=dict)
    api_key: str | None = None


@dataclass
class RequestResult:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    """All requests of one target at one concurrency, and the wall time they took together."""

    target: str
    concurrency: int
    duration_s: float
    requests: list[RequestResult]

    def summary(self) -> dict[str, float]:
        ok = [r for r in self.requests if r.error is None]
        tokens = sum(r.output_tokens for r in ok)

        def ms(values: Sequence[float], q: float) -> float:
            finite = [v for v in values if math.isfinite(v)]
            return float(np.percentile(finite, q)) * 1e3 if finite else math.nan

        itl = [gap for r in ok for gap in r.itl_s]
        return {"completed": len(ok), "failed": len(self.requests) - len(ok),
                "request_throughput": len(ok) / self.duration_s, "output_throughput": tokens / self.duration_s,
                "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else math.nan,
                "mean_output_tokens": tokens / len(ok) if ok else math.nan,
                **{f"{name}_p{q}_ms": ms(values, q)
                   for name, values in (("ttft", [r.ttft_s for r in ok]), ("tpot", [r.tpot_s for r in ok]),
                                        ("itl", itl))
                   for q in (50, 99)}}


# ----- prompts -----

def build_prompts(n: int, seed: int) -> list[str]:
    """``n`` passages of 20-48 words (about 25-115 tokens for the embedded tokenizer) from the Python
    language reference shipped with CPython (``pydoc_data.topics``): in the embedded model's training
    domain, identical for every target, fixed by ``seed``."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    names = sorted(topics)
    prompts = []
    for _ in range(n):
        words = topics[rng.choice(names)].split()
        length = rng.randint(20, 48)
        start = rng.randrange(max(1, len(words) - length))
        prompts.append(" ".join(words[start:start + length]))
    return prompts


# ----- HTTP client -----

async def stream_completion(client: httpx.AsyncClient, target: Target, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": target.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **target.extra_body}
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    result = RequestResult()
    chunk_times: list[float] = []
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{target.base_url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raise BenchError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise BenchError(f"error event in stream: {event['error']}")
                if any(choice.get("text") for choice in event.get("choices") or []):
                    chunk_times.append(time.perf_counter())
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
    except (httpx.HTTPError, BenchError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    if not chunk_times:
        result.error = "stream ended without any content"
        return result
    result.output_tokens = result.output_tokens or len(chunk_times)
    result.ttft_s = chunk_times[0] - start
    result.itl_s = np.diff(chunk_times).tolist()
    return result


async def run_level(target: Target, prompts: Sequence[str], concurrency: int, max_tokens: int) -> LevelResult:
    """Every prompt once, at most ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one(prompt: str) -> RequestResult:
            async with gate:
                return await stream_completion(client, target, prompt, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return LevelResult(target.name, concurrency, time.perf_counter() - start, list(results))


def bench_server(target: Target, prompts: Sequence[str], levels: Sequence[int], num_prompts: int | None,
                 max_tokens: int, warmup: int) -> list[LevelResult]:
    """Warm-up requests first (they pay for lazy initialisation: transformers serve builds its batching
    manager and KV cache on the first request), then one wave of requests per concurrency."""
    warm = asyncio.run(run_level(target, prompts[:warmup], warmup, max_tokens)) if warmup else None
    if warm is not None and (errors := [r.error for r in warm.requests if r.error]):
        raise BenchError(f"{target.name}: warm-up request failed: {errors[0]}")
    results = []
    for c in levels:
        n = num_prompts or max(16, 4 * c)
        level = asyncio.run(run_level(target, prompts[:n], c, max_tokens))
        if errors := [r.error for r in level.requests if r.error]:
            print(f"{target.name} c={c}: {len(errors)} requests failed, first: {errors[0]}", file=sys.stderr)
        results.append(level)
        print(f"{target.name} c={c}: {level.summary()['output_throughput']:.1f} output tok/s", file=sys.stderr)
    return results


def first_text_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot list the models of {base_url} ({exc}); pass --model") from exc
    text = [m for m in models if m.get("modality", "text") == "text"]
    if not text:
        raise BenchError(f"{base_url}/v1/models lists no text model; pass --model")
    return text[0]["id"]


# ----- managed servers -----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(threads: int) -> dict[str, str]:
    """The same thread budget for every server; no GENSERVE_* from the caller's shell (a managed
    genserve is configured by this script alone, open on loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENSERVE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


@contextlib.contextmanager
def managed_server(name: str, cmd: list[str], ready_url: str, env: dict[str, str], log_path: Path,
                   timeout_s: float) -> Iterator[Path]:
    """Run ``cmd`` until the block ends; enter once ``ready_url`` answers 200. Yields the log path so
    that later failures can quote it."""
    with open(log_path, "wb") as log:
        # A session of its own: Ctrl-C reaches only this script, whose ``finally`` stops the server.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(ready_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"not ready in {timeout_s:.0f} s" if proc.returncode is None else f"exited with {proc.returncode}"
                raise BenchError(f"{name} {why}: {shlex.join(cmd)}\n{log_tail(log_path)}")
            time.sleep(0.5)
        yield log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(tail)} lines of {path.name} ---\n" + "\n".join(tail)


def builtin_entry(model_id: str) -> dict:
    """The built-in registry entry ``model_id`` (its batching and queue settings), its weights
    directory made absolute."""
    builtin = yaml.safe_load((REPO / "src" / "genserve" / "models" / "registry.yaml").read_text())["models"]
    entry = next(e for e in builtin if e["id"] == model_id)
    return entry | {"source": str(REPO / "src" / "genserve" / "models" / entry["source"])}


def registry_command(entries: list[dict], port: int, workdir: Path) -> list[str]:
    """``genserve serve`` on loopback ``port`` with a registry (written to ``workdir``) holding only
    ``entries``."""
    registry = workdir / "registry.yaml"
    registry.write_text(yaml.safe_dump({"include_defaults": False, "models": entries}))
    return [sys.executable, "-m", "genserve", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--config", str(registry), "--log-level", "warning"]


@contextlib.contextmanager
def registry_server(entries: list[dict], workdir: Path, threads: int, timeout_s: float) -> Iterator[str]:
    """A genserve server for ``entries`` alone, with ``threads`` torch threads, until the block
    ends; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with managed_server("genserve", registry_command(entries, port, workdir), f"{url}/health/ready",
                        server_env(threads), workdir / "genserve.log", timeout_s):
        yield url


def genserve_command(model_dir: Path, port: int, workdir: Path, dtype: str) -> list[str]:
    """``genserve serve`` with a registry holding only the text model: the built-in
    ``genserve-text-tiny`` entry (its batching and queue settings) pointed at ``model_dir``. Its
    engine process keeps its own default thread count (all cores but one)."""
    entry = builtin_entry(GENSERVE_ENTRY) | {"id": model_dir.name, "source": str(model_dir), "dtype": dtype}
    return registry_command([entry], port, workdir)


def transformers_command(model_dir: Path, port: int, flags: str, dtype: str) -> list[str]:
    # `transformers serve` loads onto a device through a device_map, which needs accelerate, and on
    # CPU sizes its KV cache from psutil's view of memory: both come with `transformers[serving]`.
    missing = [m for m in ("accelerate", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchError(f"transformers serve needs {' and '.join(missing)}: pip install 'transformers[serving]'")
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--dtype", dtype, *shlex.split(flags), str(model_dir)]


def bench_managed(kind: str, args: argparse.Namespace, prompts: Sequence[str], workdir: Path) -> list[LevelResult]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if kind == "genserve":
        cmd, ready = genserve_command(args.model_dir, port, workdir, args.dtype), f"{base}/health/ready"
        target = Target("genserve", base, args.model_dir.name, {"ignore_eos": True})
    else:
        # transformers serve rejects unknown fields (422) such as ignore_eos, but takes a whole
        # GenerationConfig as JSON; an EOS id of -1 turns the stop off in its continuous batching.
        cmd, ready = transformers_command(args.model_dir, port, args.transformers_flags, args.dtype), f"{base}/health"
        config = json.dumps({"eos_token_id": -1, "do_sample": False})
        target = Target("transformers", base, str(args.model_dir), {"generation_config": config})
    log = workdir / f"{kind}.log"
    env = server_env(args.threads)
    if kind == "genserve" and args.genserve_moderation == "off":
        env["GENSERVE_MODERATION"] = json.dumps({"enabled": False})
    with managed_server(kind, cmd, ready, env, log, args.startup_timeout):
        try:
            return bench_server(target, prompts, args.concurrency, args.num_prompts, args.max_tokens, args.warmup)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{log_tail(log)}") from exc


# ----- sequential model.generate -----

class TokenClock:
    """A ``generate`` streamer that only notes when each ``put`` arrives: the prompt first, then one
    call per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_generate(model_dir: Path, prompts: Sequence[str], max_tokens: int, threads: int,
                   dtype: str) -> LevelResult:
    """Transformers ``generate`` on one prompt at a time, greedy, exactly ``max_tokens`` new tokens;
    TTFT and ITL come from the streamer's per-token callbacks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def one(prompt: str) -> RequestResult:
        clock = TokenClock()
        start = time.perf_counter()
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 streamer=clock, pad_token_id=tokenizer.pad_token_id)
        e2e = time.perf_counter() - start
        prompt_len = inputs["input_ids"].shape[1]
        new = out.shape[1] - prompt_len
        token_times = clock.times[-new:]
        return RequestResult(prompt_len, new, token_times[0] - start, e2e, np.diff(token_times).tolist())

    one(prompts[0])  # warm-up
    start = time.perf_counter()
    results = [one(p) for p in prompts]
    return LevelResult("generate", 1, time.perf_counter() - start, results)


# ----- report -----

def header(args: argparse.Namespace) -> list[str]:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers"))
    return [f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"machine: {platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs; OMP/torch "
            f"threads: {args.threads} for transformers serve and generate, genserve's engine process its default "
            f"(cores - 1); dtype {args.dtype}; genserve's moderation {args.genserve_moderation}; "
            f"python {platform.python_version()}, {versions}",
            f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
            f"requests: {args.max_tokens} output tokens each (EOS ignored), greedy, prompts from pydoc_data.topics "
            f"seed {args.seed}; {args.warmup} warm-up requests per server"]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def table(levels: Sequence[LevelResult]) -> list[str]:
    cols = ["target", "concurrency", "requests", "failed", "out tok/req", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
            "TPOT p50", "TPOT p99", "ITL p50", "ITL p99"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for level in levels:
        s = level.summary()
        cells = [level.target, str(level.concurrency), str(s["completed"]), str(s["failed"]),
                 f"{s['mean_output_tokens']:.1f}", f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                 *(f"{s[f'{m}_p{q}_ms']:.1f}" for m in ("ttft", "tpot", "itl") for q in (50, 99))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", "latencies in ms; generate is sequential model.generate in-process (concurrency 1)"]


def ratios(levels: Sequence[LevelResult], concurrency: int) -> list[str]:
    """genserve against each baseline at ``concurrency`` (sequential generate: its only level)."""
    by = {(lv.target, lv.concurrency): lv.summary() for lv in levels}
    ours = by.get(("genserve", concurrency))
    if ours is None:
        return []
    lines = [f"At concurrency {concurrency}:"]
    if (theirs := by.get(("transformers", concurrency))) and theirs["completed"]:
        tok = ours["output_throughput"] / theirs["output_throughput"]
        ttft = ours["ttft_p50_ms"] / theirs["ttft_p50_ms"]
        lines += [f"- genserve / transformers serve output tok/s: {tok:.2f}x (target >= 2x: {_met(tok >= 2)})",
                  f"- genserve / transformers serve TTFT p50: {ttft:.2f} (target <= 1: {_met(ttft <= 1)})"]
    if (theirs := by.get(("generate", 1))) and theirs["completed"]:
        tok = ours["output_throughput"] / theirs["output_throughput"]
        lines.append(f"- genserve / sequential generate output tok/s: {tok:.2f}x (target >= 10x: {_met(tok >= 10)})")
    return lines if len(lines) > 1 else []


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ----- command line -----

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", default=[], metavar="NAME=BASE_URL",
                   help="a running OpenAI-compatible server (base URL with or without /v1); repeatable")
    p.add_argument("--api-key", help="bearer key for --target servers")
    p.add_argument("--model", help="model id for --target servers (default: the first text model they list)")
    p.add_argument("--extra-body", type=json.loads, default={"ignore_eos": True},
                   help="JSON merged into every --target request (default: vLLM's and genserve's ignore_eos)")
    p.add_argument("--serve", action="append", default=[], choices=["genserve", "transformers"],
                   help="start this server here on a free loopback port, measure it, stop it; repeatable")
    p.add_argument("--sequential-generate", action="store_true", help="measure model.generate, one prompt at a time")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                   help="Hugging Face model directory for --serve and --sequential-generate")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32],
                   help="comma-separated sweep (default 1,8,32)")
    p.add_argument("--num-prompts", type=int, help="requests per concurrency (default max(16, 4*concurrency))")
    p.add_argument("--generate-prompts", type=int, default=16, help="prompts for --sequential-generate")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2, help="uncounted requests per server before the sweep")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OMP/torch threads for every server and for generate (default: all cores)")
    p.add_argument("--genserve-moderation", choices=["default", "off"], default="default",
                   help="the managed genserve's moderation: as it ships (default), or the global policy off "
                   "(the engine alone, as the baselines have no moderation)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of every managed server and of generate")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds a managed server may take to start")
    p.add_argument("--transformers-flags", default=TRANSFORMERS_FLAGS,
                   help=f"extra flags for transformers serve (default: {TRANSFORMERS_FLAGS!r})")
    p.add_argument("--json", type=Path, help="write every request's measurements here")
    args = p.parse_args(argv)
    if not (args.target or args.serve or args.sequential_generate):
        args.serve, args.sequential_generate = ["genserve", "transformers"], True
    args.model_dir = args.model_dir.resolve()
    if (args.serve or args.sequential_generate) and not (args.model_dir / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir} is not a Hugging Face model directory (no config.json)")
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.warmup < 0:
        p.error(f"--concurrency {args.concurrency}, --max-tokens {args.max_tokens} and --warmup {args.warmup} "
                "must be positive (warm-up may be 0)")
    return args


def parse_target(spec: str, args: argparse.Namespace) -> Target:
    name, sep, url = spec.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise BenchError(f"--target {spec!r}: expected NAME=http(s)://HOST:PORT")
    base = url.rstrip("/").removesuffix("/v1")
    return Target(name, base, args.model or first_text_model(base, args.api_key), args.extra_body, args.api_key)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"text_serving: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    began, head = time.perf_counter(), header(args)
    prompts = build_prompts(max(args.num_prompts or 0, 4 * max(args.concurrency), 16, args.generate_prompts), args.seed)
    levels: list[LevelResult] = []
    for spec in args.target:
        target = parse_target(spec, args)
        levels += bench_server(target, prompts, args.concurrency, args.num_prompts, args.max_tokens, args.warmup)
    with tempfile.TemporaryDirectory(prefix="text-serving-") as tmp:
        for kind in args.serve:
            levels += bench_managed(kind, args, prompts, Path(tmp))
    if args.sequential_generate:
        levels.append(bench_generate(args.model_dir, prompts[:args.generate_prompts], args.max_tokens, args.threads,
                                     args.dtype))
    lines = [*head, f"wall time: {time.perf_counter() - began:.0f} s", "", *table(levels), "",
             *ratios(levels, max(args.concurrency))]
    print("\n".join(lines))
    if args.json:
        raw = [{"target": lv.target, "concurrency": lv.concurrency, "duration_s": lv.duration_s,
                "summary": lv.summary(), "requests": [asdict(r) for r in lv.requests]} for lv in levels]
        args.json.write_text(json.dumps({"header": head, "results": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
