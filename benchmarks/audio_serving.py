"""Real-time factor of genserve's audio endpoints on CPU, one request at a time and concurrent.

RTF = wall-clock seconds / seconds of audio produced (below 1: faster than real time). For each
embedded audio model, in one run against one ``genserve serve`` holding just the two models:

- ``speech``: ``POST /v1/audio/speech`` (genserve-speech, espeak-ng, WAV) for ``--requests``
  paragraphs, sent one after another, then all at once (espeak-ng processes run side by side, at
  most the entry's ``max_batch_size``);
- ``music``: ``POST /v1/audio/music`` (genserve-music, WAV, ``--seconds`` each, distinct seeds),
  one after another, then all at once (the dynamic batcher samples them in one batched run);
- ``music model only``: ``ChoraleGenerator.generate`` in this process, one spec per call against
  one call for all of them, without HTTP or synthesis, to show where the time goes.

The ratio column is concurrent (batched) throughput over sequential throughput::

    .venv/bin/python benchmarks/audio_serving.py
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import builtin_entry, cpu_name, registry_server  # noqa: E402

PARAGRAPH = ("Paragraph {i}. The committee met on a grey Tuesday morning to review the plans for the new "
             "library. After a long discussion about the budget, the windows and the reading rooms, they "
             "agreed to open the building to the public next spring.")


async def _timed(client: httpx.AsyncClient, path: str, bodies: list[dict], concurrent: bool) -> tuple[float, float]:
    """(wall seconds, audio seconds) for ``bodies`` posted in order or all at once."""
    async def one(body: dict) -> float:
        r = await client.post(path, json=body)
        r.raise_for_status()
        info = sf.info(io.BytesIO(r.content))
        return info.frames / info.samplerate

    start = time.perf_counter()
    durations = await asyncio.gather(*map(one, bodies)) if concurrent else [await one(b) for b in bodies]
    audio = sum(durations)
    return time.perf_counter() - start, audio


async def bench_http(url: str, requests: int, seconds: float) -> list[dict]:
    speech = [{"model": "genserve-speech", "voice": "alloy", "input": PARAGRAPH.format(i=i), "response_format": "wav"}
              for i in range(requests)]
    music = [{"model": "genserve-music", "seconds": seconds, "tempo": 90, "key": "D major", "seed": i,
              "response_format": "wav"} for i in range(requests)]
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _timed(client, "/v1/audio/speech", speech[:1], False)  # warm-up
        await _timed(client, "/v1/audio/music", music[:1], False)
        for name, path, bodies in (("speech", "/v1/audio/speech", speech), ("music", "/v1/audio/music", music)):
            for concurrent in (False, True):
                wall, audio = await _timed(client, path, bodies, concurrent)
                rows.append({"name": name, "mode": "concurrent" if concurrent else "sequential",
                             "requests": len(bodies), "audio_s": audio, "wall_s": wall})
    return rows


def bench_music_model(requests: int, seconds: float, threads: int) -> list[dict]:
    from genserve.models.common.loading import load_family, weights_dir
    from genserve.models.music import MusicSpec

    torch.set_num_threads(threads)
    gen = load_family("chorale", weights_dir() / "genserve-music", device="cpu")
    specs = [MusicSpec(seconds=seconds, tempo=90, key="D major", seed=i) for i in range(requests)]
    gen.generate(specs[:1])  # warm-up
    rows = []
    for mode, batches in (("sequential", [[s] for s in specs]), ("batched", [specs])):
        start = time.perf_counter()
        for batch in batches:
            gen.generate(batch)
        rows.append({"name": "music model only", "mode": mode, "requests": requests,
                     "audio_s": seconds * requests, "wall_s": time.perf_counter() - start})
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| what | mode | requests | audio s | wall s | RTF | batched/sequential throughput |",
           "|---|---|---:|---:|---:|---:|---:|"]
    sequential = {r["name"]: r for r in rows if r["mode"] == "sequential"}
    for r in rows:
        rtf = r["wall_s"] / r["audio_s"]
        base = sequential[r["name"]]
        ratio = "" if r is base else f"**{(base['wall_s'] / base['audio_s']) / rtf:.2f}×**"
        out.append(f"| {r['name']} | {r['mode']} | {r['requests']} | {r['audio_s']:.1f} | {r['wall_s']:.2f} | "
                   f"{rtf:.4f} | {ratio} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per measurement")
    parser.add_argument("--seconds", type=float, default=20.0, help="music: seconds per request")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and the model-only run")
    args = parser.parse_args(argv)
    entries = [builtin_entry("genserve-speech"), builtin_entry("genserve-music")]
    with tempfile.TemporaryDirectory() as tmp, registry_server(entries, Path(tmp), args.threads, 300) as url:
        rows = asyncio.run(bench_http(url, args.requests, args.seconds))
    rows += bench_music_model(args.requests, args.seconds, args.threads)
    print(f"# audio_serving: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"threads {args.threads}, requests {args.requests}, music {args.seconds:g} s each\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
