"""Without a GPU, Triton must see ``TRITON_INTERPRET=1`` before anything imports it, and diffusers
imports it: the kernels' conftest sets it, here before the test modules import diffusers, so that
the diffusers attention tests can run genserve's kernel in the interpreter."""

import tests.kernels.conftest  # noqa: F401
