"""Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, that is when
``kernels._triton_attention`` or ``kernels._triton_int8`` is first imported, and for Triton's own
``triton.language`` functions when ``triton`` is. The public functions import those modules only
for CUDA tensors, so on a CPU machine nothing has imported them before this file is collected,
whatever other test packages imported ``kernels``; but diffusers imports ``triton``, so test
directories that import diffusers and run kernels import this file from their own conftest.py
first (tests/models). The fixtures below fail loudly if any of that stops being true. With a GPU
the same tests run the compiled kernels on it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Triton's interpreter keeps bfloat16 as raw uint16 and tl.dot multiplies those bit patterns
# (triton-lang/triton#11584; the debugging guide lists bfloat16 as unsupported), so bfloat16
# kernels are checked on a GPU only: marked gpu, so CPU runs deselect them like the other GPU tests.
BF16_NEEDS_GPU = [pytest.mark.gpu,
                  pytest.mark.skipif(not HAS_CUDA, reason="Triton's interpreter has no bfloat16 tl.dot")]


def _triton_module(name: str) -> ModuleType:
    pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]' installs it on Linux)")
    module = importlib.import_module(name)
    if not HAS_CUDA and not module._INTERPRET:
        pytest.fail(f"{name} was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU")
    if not HAS_CUDA:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):  # triton.language's own @triton.jit functions
            pytest.fail("triton was imported (diffusers imports it) before TRITON_INTERPRET=1 was set, so "
                        "kernels cannot run on CPU: set it in a conftest.py of the test's directory")
    return module


@pytest.fixture(scope="session")
def triton_attention() -> ModuleType:
    return _triton_module("genserve.kernels._triton_attention")


@pytest.fixture(scope="session")
def triton_int8() -> ModuleType:
    return _triton_module("genserve.kernels._triton_int8")


@pytest.fixture(scope="session")
def triton_int4() -> ModuleType:
    return _triton_module("genserve.kernels._triton_int4")
