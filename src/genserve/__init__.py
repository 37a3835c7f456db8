"""genserve: one HTTP API for generative models of every kind (text, images, audio, molecules).

``genserve.app`` is the gateway, ``genserve.models`` the model families and their weights,
``genserve.kernels`` the fast ops; ``genserve.cli`` is the ``genserve`` command.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0"
