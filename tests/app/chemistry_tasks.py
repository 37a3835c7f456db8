"""What ``test_chemistry_workers`` runs in the chemistry workers: a module of its own, light to import
(a worker imports it by name to find the function; the test module would import the whole app)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def crash(pid_file: str) -> None:
    """Writes its pid, then dies of a segmentation fault, as RDKit's C++ would."""
    Path(pid_file).write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSEGV)


def stuck(pid_file: str) -> int:
    """Writes its pid, then spends minutes in C code that holds the GIL, where no Python signal handler
    runs (as RDKit's C++ would on a pathological molecule)."""
    Path(pid_file).write_text(str(os.getpid()))
    return sum(range(10**12))
