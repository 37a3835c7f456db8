"""Module surgery shared by the quantizers: swapping a model's ``nn.Linear`` layers in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module],
                    skip: Callable[[str, nn.Linear], bool] | None = None) -> int:
    """Replaces every ``nn.Linear`` of ``model`` by ``make(linear)`` in place; returns how many.

    ``skip(name, linear)`` returning True keeps a layer. A layer whose weight is tied to another
    parameter (an ``lm_head`` sharing the embedding matrix) is always kept: replacing it would keep
    the float matrix alive for the other user and save nothing.
    """
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    targets = [(name, m) for name, m in model.named_modules()
               if name and isinstance(m, nn.Linear) and uses[id(m.weight)] == 1 and not (skip and skip(name, m))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(linear))
    return len(targets)
