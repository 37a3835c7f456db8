"""Which implementation a kernel call takes: the Triton kernels for CUDA tensors when Triton
imports, the PyTorch path otherwise.

Triton is imported only when a CUDA tensor asks for it, so CPU-only installs (whose torch wheel
ships without Triton) never import it, and ``TRITON_INTERPRET`` is read when the ``_triton_*``
kernel modules are first imported, not when ``kernels`` is.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_importable()
