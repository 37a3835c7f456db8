"""Paged KV blocks against one full-context slot per sequence, at the same KV memory.

A slot design reserves the whole context (512 tokens for genserve-text-tiny) for every sequence;
paged blocks hand out ``block_size`` tokens at a time. The engine runs both: a block as long as
the context *is* a slot. Same model, same requests (prompts from ``pydoc_data.topics``, greedy,
EOS ignored), all submitted at once, in process (no HTTP), one thread by default::

    .venv/bin/python benchmarks/kv_cache.py --kv-tokens 4096
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from genserve.models.llama import load  # noqa: E402
from genserve.models.text.engine import EngineConfig, LLMEngine  # noqa: E402
from genserve.models.text.sampling import SamplingParams  # noqa: E402


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    import pydoc_data.topics

    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 4 * length]
    return [tokenizer(texts[i % len(texts)])["input_ids"][:length] for i in range(count)]


def run(tm, config: EngineConfig, requests: list[list[int]], max_tokens: int) -> dict:
    engine = LLMEngine(tm, config)
    for i, ids in enumerate(requests):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                           lambda ev: None)
    steps = seqs = preempted = peak = 0
    start = time.perf_counter()
    while engine.has_work():
        stats = engine.step()
        steps += 1
        seqs += stats.num_seqs
        preempted += stats.num_preemptions
        peak = max(peak, stats.num_seqs)
    seconds = time.perf_counter() - start
    return {"steps": steps, "mean_batch": seqs / steps, "peak_batch": peak, "preemptions": preempted,
            "tok_s": len(requests) * max_tokens / seconds, "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path,
                   default=REPO / "src" / "genserve" / "models" / "weights" / "genserve-text-tiny")
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV cache size in tokens, the same for both")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tm = load(args.model_dir, torch.device("cpu"), torch.float32)
    requests = prompts(tm.tokenizer, args.requests, args.prompt_tokens)
    rows = []
    for name, block in (("paged blocks", args.block_size), ("full-context slots", tm.context)):
        config = EngineConfig(block_size=block, num_blocks=args.kv_tokens // block, max_num_seqs=64,
                              max_num_batched_tokens=max(2048, tm.context + 64))
        rows.append((name, block, run(tm, config, requests, args.max_tokens)))
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; {platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    print(f"command: python benchmarks/kv_cache.py {' '.join(sys.argv[1:])}")
    print(f"{args.requests} requests x ({args.prompt_tokens} prompt + {args.max_tokens} generated) tokens, "
          f"KV cache {args.kv_tokens} tokens, context {tm.context}\n")
    print("| layout | block | steps | mean batch | peak batch | preemptions | out tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, block, r in rows:
        print(f"| {name} | {block} | {r['steps']} | {r['mean_batch']:.1f} | {r['peak_batch']} | {r['preemptions']} "
              f"| {r['tok_s']:.0f} |")
    print(f"\npaged / slots output tok/s: {rows[0][2]['tok_s'] / rows[1][2]['tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
