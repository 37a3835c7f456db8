"""What output and input moderation cost a streamed chat/completions load, in one run.

One genserve server, the global policy off, two entries on the same shipped weights: ``plain`` (no
moderation) and ``moderated`` (the default policy: input and output, every text tier, the hold-back
gate). Each has its own engine process, idle while the other is measured. Levels alternate
(plain, moderated) at each concurrency, ``--rounds`` times, with the same prompts and token counts
(``ignore_eos``), and the best round of each is reported: output tokens/s and TTFT p50/p99 with and
without moderation, and their ratio.

    .venv/bin/python benchmarks/moderation_overhead.py --json /tmp/moderation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from text_serving import (
    GENSERVE_ENTRY,
    Target,
    bench_server,
    build_prompts,
    builtin_entry,
    free_port,
    managed_server,
    registry_command,
    server_env,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,32", help="concurrencies, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    base = builtin_entry(GENSERVE_ENTRY)
    entries = [base | {"id": "plain"}, base | {"id": "moderated", "moderation": {"input": True, "output": True}}]
    prompts = build_prompts(max(64, 4 * max(levels)), seed=0)
    results: dict[str, dict[int, list[dict[str, float]]]] = {"plain": {}, "moderated": {}}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = server_env(1) | {"GENSERVE_MODERATION": json.dumps({"enabled": False})}
        with managed_server("genserve", registry_command(entries, port, Path(tmp)), f"{url}/health/ready", env,
                            Path(tmp) / "genserve.log", 300):
            for _ in range(args.rounds):
                for c in levels:
                    for name in ("plain", "moderated"):
                        target = Target(name, url, name, {"ignore_eos": True})
                        (level,) = bench_server(target, prompts, [c], None, args.max_tokens, warmup=2)
                        results[name].setdefault(c, []).append(level.summary())
    rows = ["| streams | output tok/s plain | moderated | ratio | TTFT p50 plain (ms) | moderated | TTFT p99 plain "
            "| moderated |", "|---|---|---|---|---|---|---|---|"]
    out = {}
    for c in levels:
        best = {n: max(results[n][c], key=lambda s: s["output_throughput"]) for n in results}
        p, m = best["plain"], best["moderated"]
        ratio = m["output_throughput"] / p["output_throughput"]
        cells = [p["output_throughput"], m["output_throughput"], ratio, p["ttft_p50_ms"], m["ttft_p50_ms"],
                 p["ttft_p99_ms"], m["ttft_p99_ms"]]
        rows.append(f"| {c} | " + " | ".join(f"{v:.3f}" if v is ratio else f"{v:.1f}" for v in cells) + " |")
        out[c] = {"plain": p, "moderated": m, "throughput_ratio": ratio, "all_rounds": {n: results[n][c]
                                                                                        for n in results}}
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
