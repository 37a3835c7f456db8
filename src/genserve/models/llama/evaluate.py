"""``genserve eval text``: held-out perplexity and linear-weight memory, full precision against int8
and int4.

The held-out documents are those the training run set aside (``Doc.held_out``), rendered and
tokenized the same way; each variant loads the same directory through ``models.llama.load``, the
path serving uses, so what is measured is what a ``quantization: int8`` registry entry serves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from genserve.kernels.int4 import Int4Linear
from genserve.kernels.int8 import Int8Linear
from genserve.models.common.loading import weights_dir
from genserve.models.llama import load
from genserve.models.llama.corpus import documents
from genserve.models.llama.train import encode, heldout_nll


def heldout_ids(tokenizer, seed: int = 0) -> torch.Tensor:
    """The held-out token stream (documents the training run never saw)."""
    return encode([d for d in documents() if d.held_out], tokenizer, seed)[1]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder's linear weights (and int8 scales); a tied lm_head is the embedding's."""
    total, seen = 0, set()
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    for module in model.modules():
        tensors = []
        if isinstance(module, Int8Linear):
            tensors = [module.qweight, module.scales]
        elif isinstance(module, Int4Linear):
            tensors = [module.qweight, module.scales, module.zeros]
        elif isinstance(module, nn.Linear):
            tensors = [module.weight]
        for t in tensors:
            if t.data_ptr() not in seen and not any(t is e for e in embeddings):
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def eval_text(path: Path, quantizations: tuple[str, ...] = ("none", "int8", "int4"), max_tokens: int | None = None,
              threads: int | None = None) -> list[dict]:
    """One row per quantization: held-out NLL and perplexity (fp32 activations), linear-weight bytes."""
    if threads:
        torch.set_num_threads(threads)
    rows, ids = [], None
    for q in quantizations:
        tm = load(path, torch.device("cpu"), torch.float32, quantization=q)
        if ids is None:
            ids = heldout_ids(tm.tokenizer)
            ids = ids[: max_tokens + 1] if max_tokens else ids
        nll = heldout_nll(tm.model, ids, tm.context)
        rows.append({"quantization": q, "heldout_tokens": (len(ids) - 1) // tm.context * tm.context,
                     "nll": nll, "ppl": math.exp(nll), "linear_weight_bytes": linear_weight_bytes(tm.model)})
    base = rows[0]
    for r in rows:
        r["ppl_change"] = r["ppl"] / base["ppl"] - 1
        r["memory_ratio"] = base["linear_weight_bytes"] / r["linear_weight_bytes"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| weights | held-out tokens | NLL | perplexity | vs fp32 | linear weights | smaller by |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'fp32' if r['quantization'] == 'none' else r['quantization']} | {r['heldout_tokens']:,} "
                     f"| {r['nll']:.4f} | {r['ppl']:.3f} | {r['ppl_change']:+.2%} "
                     f"| {r['linear_weight_bytes'] / 2**20:.2f} MiB | {r['memory_ratio']:.2f}x |")
    return "\n".join(lines)


def evaluate(model: str | None = None, quantization: tuple[str, ...] = ("none", "int8", "int4"),
             max_tokens: int | None = None, threads: int | None = None) -> str:
    """``genserve eval text``: the table for ``model`` (default: the shipped genserve-text-tiny)."""
    path = Path(model) if model else weights_dir() / "genserve-text-tiny"
    return format_table(eval_text(path, tuple(quantization), max_tokens, threads))
