"""The semantic tier's encoder: N texts one at a time vs in one forward pass (a ``/v1/moderations`` array).

    .venv/bin/python benchmarks/moderation_encoder.py [--n 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from genserve.app.moderation.semantic import SemanticClassifier

    if args.threads:
        torch.set_num_threads(args.threads)
    tier = SemanticClassifier()
    tier.scores("warm up the encoder once")
    texts = [f"Write a short story about a dragon who learns to paint, number {i}, in three paragraphs "
             "with a twist at the end." for i in range(args.n)]

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    alone = best(lambda: [tier.scores(t) for t in texts])
    batch = best(lambda: tier.scores_batch(texts))
    print(f"{args.n} texts, {torch.get_num_threads()} threads, best of {args.repeats}:")
    print(f"  one at a time: {alone:.1f} ms ({alone / args.n:.1f} ms a text)")
    print(f"  one pass:      {batch:.1f} ms ({batch / args.n:.1f} ms a text), {alone / batch:.2f}x faster")


if __name__ == "__main__":
    main()
