"""Batch invariance: a row's result must not depend on the other rows of its batch.

oneDNN, MKL and cuBLAS choose kernels by shape. A convolution over an 8×8 map, or a linear layer
over a handful of rows, sums in another order for a batch of one than for a batch of four, so the
last bits of a row change with its neighbours. Over tens of denoising steps that flips pixels, and
a seeded request would not give the same PNG alone and batched.

``make_batch_invariant(model, probe)`` finds the layers that do this on the machine it runs on and
makes only those run row by row. ``probe(n)`` runs the model once on a batch of ``n`` rows (made
with any fixed inputs) and returns its output; the first run records the input of every leaf
layer, then each layer is run on its recorded input in a spread of batch sizes up to ``max_rows``
(``probe_sizes``) and its first and last rows compared, bit for bit, with those rows run alone.
A layer that differs gets a forward that runs its rows one at a time, which is exactly what it
computes for a batch of one. Everything else keeps its batched kernels. A last end-to-end check
compares whole-model rows alone and in batches; if they still differ (an op outside the probed
layers), the caller is told, and must not batch the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PROBED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm, nn.LayerNorm)


def run_rows_alone(module: nn.Module) -> None:
    """``module`` computes each row of its first argument as a batch of one (same results, alone
    or batched), then concatenates them."""
    batched = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() == 0 or x.shape[0] <= 1:
            return batched(x, *args, **kwargs)
        return torch.cat([batched(x[i:i + 1], *args, **kwargs) for i in range(x.shape[0])])

    module.forward = forward  # type: ignore[method-assign]


def probe_rows(n: int) -> slice:
    """The rows of the probe's fixed inputs that ``probe(n)`` runs: the first ``n`` for n > 0, row
    ``-n - 1`` alone for n < 0."""
    return slice(0, n) if n > 0 else slice(-n - 1, -n)


def probe_sizes(max_rows: int) -> list[int]:
    """Batch sizes a probe compares: the small ones, where kernels switch, and a spread above."""
    return sorted({n for n in (2, 3, 4, 5, 7, 8, 12, 16, max_rows - 1, max_rows) if 2 <= n <= max_rows})


def _varies(fn: Callable[[int], torch.Tensor], max_rows: int) -> bool:
    """Whether the first or last row of ``fn(n)`` differs from that row alone, ``fn(-k - 1)``."""
    alone: dict[int, torch.Tensor] = {}
    for n in probe_sizes(max_rows):
        out = fn(n)
        for k in (0, n - 1):
            if k not in alone:
                alone[k] = fn(-k - 1)[0]
            if not torch.equal(out[k], alone[k]):
                return True
    return False


@torch.no_grad()
def make_batch_invariant(model: nn.Module, probe: Callable[[int], torch.Tensor],
                         max_rows: int) -> tuple[list[str], bool]:
    """Makes ``model``'s batch-variant layers run row by row. ``probe(n)`` runs the model on the
    first ``n`` rows of fixed inputs, ``probe(-k - 1)`` on row ``k`` alone. Returns the wrapped
    layers' names, and whether whole-model rows are now the same alone and batched (if not, the
    caller must not batch this model)."""
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:
            if name not in inputs and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
                inputs[name] = args[0].detach().clone()
        return hook

    layers = {name: m for name, m in model.named_modules() if isinstance(m, PROBED)}
    hooks = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    try:
        probe(max_rows)
    finally:
        for h in hooks:
            h.remove()
    wrapped = []
    for name, x in inputs.items():
        layer, rows = layers[name], x.shape[0]
        if rows < 2:
            continue

        def sliced(n: int, layer: nn.Module = layer, x: torch.Tensor = x) -> torch.Tensor:
            return layer(x[probe_rows(n)])

        if _varies(sliced, rows):
            run_rows_alone(layer)
            wrapped.append(name)
    invariant = not _varies(probe, max_rows)
    log.log(logging.INFO if invariant else logging.WARNING, "%s: %d of %d layers run row by row; rows %s",
            type(model).__name__, len(wrapped), len(layers),
            "are the same alone and batched" if invariant else "STILL depend on their batch")
    return wrapped, invariant
