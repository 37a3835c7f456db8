"""What every training report and model card records: the machine it ran on, the report file, the card."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine(threads: int) -> str:
    """The CPU's model name, the torch threads and torch version: ``"<cpu>, 2 threads, torch 2.x"``."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {threads} threads, torch {torch.__version__}"


def write_report(out: Path, report: dict, card: str | None = None) -> None:
    """``out/training_report.json`` and, given, the model card ``out/README.md``."""
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if card is not None:
        (out / "README.md").write_text(card)
