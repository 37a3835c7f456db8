"""What output and input moderation cost a streamed chat/completions load, in one run.

One genserve server, the global policy off, three entries on the same shipped weights: ``plain`` (no
moderation), ``moderated`` (the default policy: input and output, every text tier, the hold-back gate)
and ``moderated-fast`` (the same without the semantic tier on inputs). Each has its own engine
process, idle while another is measured. Levels alternate (plain, moderated, moderated-fast) at each
concurrency, ``--rounds`` times, with the same prompts and token counts (``ignore_eos``), and the best
round of each is reported: output tokens/s and TTFT p50/p99, and the ratio to ``plain``.

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
    entries = [base | {"id": "plain"}, base | {"id": "moderated", "moderation": {"input": True, "output": True}},
               base | {"id": "moderated-fast", "moderation": {"input": True, "output": True, "semantic": False}}]
    prompts = build_prompts(max(64, 4 * max(levels)), seed=0)
    names = ("plain", "moderated", "moderated-fast")
    results: dict[str, dict[int, list[dict[str, float]]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = server_env(1) | {"GENSERVE_MODERATION": json.dumps({"enabled": False})}
        with managed_server("genserve", registry_command(entries, port, Path(tmp)), f"{url}/health/ready", env,
                            Path(tmp) / "genserve.log", 300):
            for _ in range(args.rounds):
                for c in levels:
                    for name in names:
                        target = Target(name, url, name, {"ignore_eos": True})
                        (level,) = bench_server(target, prompts, [c], None, args.max_tokens, warmup=2)
                        results[name].setdefault(c, []).append(level.summary())
    rows = ["| streams | entry | output tok/s | ratio to plain | TTFT p50 (ms) | TTFT p99 (ms) | failed |",
            "|---|---|---|---|---|---|---|"]
    out: dict[int, dict] = {}
    for c in levels:
        best = {n: max(results[n][c], key=lambda s: s["output_throughput"]) for n in names}
        out[c] = {"best": best, "all_rounds": {n: results[n][c] for n in names}}
        for n in names:
            b = best[n]
            ratio = b["output_throughput"] / best["plain"]["output_throughput"]
            rows.append(f"| {c} | {n} | {b['output_throughput']:.1f} | {ratio:.3f} | {b['ttft_p50_ms']:.1f} | "
                        f"{b['ttft_p99_ms']:.1f} | {b['failed']:.0f} |")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
