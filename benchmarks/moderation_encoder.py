"""The semantic tier's encoder: N texts one at a time vs in one forward pass (a ``/v1/moderations`` array),
and the CPU runtimes side by side: sentence-transformers in torch (what the tier ran on before) against
the tier's ``OnnxEncoder`` (onnxruntime), one text at a time on one thread, embeddings compared.

    .venv/bin/python benchmarks/moderation_encoder.py [--n 32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from genserve.app.moderation.semantic import SemanticClassifier

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
    print(f"the tier (onnxruntime on one thread), {args.n} texts, best of {args.repeats}:")
    print(f"  one at a time: {alone:.1f} ms ({alone / args.n:.1f} ms a text)")
    print(f"  one pass:      {batch:.1f} ms ({batch / args.n:.1f} ms a text), {alone / batch:.2f}x faster")

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from genserve.app.moderation.semantic import OnnxEncoder, _encoder_dir

    torch.set_num_threads(1)
    st = SentenceTransformer(str(_encoder_dir()), device="cpu")
    ort = OnnxEncoder(_encoder_dir(), threads=1)
    st.encode(texts[:1]), ort.encode(texts[:1])
    t_st = best(lambda: [st.encode([t], normalize_embeddings=True) for t in texts])
    t_ort = best(lambda: [ort.encode([t]) for t in texts])
    cos = np.sum(st.encode(texts, normalize_embeddings=True) * ort.encode(texts), axis=1)
    print(f"one text at a time on one thread, {args.n} texts, best of {args.repeats}:")
    print(f"  sentence-transformers (torch): {t_st / args.n:.2f} ms a text")
    print(f"  OnnxEncoder (onnxruntime):     {t_ort / args.n:.2f} ms a text, {t_st / t_ort:.2f}x less; "
          f"cosine to torch's embeddings: min {cos.min():.6f}")


if __name__ == "__main__":
    main()
