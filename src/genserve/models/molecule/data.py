"""The MOSES data sets (Polykovskiy et al. 2020), read from the installed ``molsets`` wheel.

The wheel ships ``moses/dataset/data/{train,test,test_scaffolds}.csv.gz`` (1.58M / 176k / 176k
SMILES) and ``{test,test_scaffolds}_stats.npz`` (MOSES's precomputed test-set statistics). We read
the files and never ``import moses``: its package imports need pomegranate and pandas-1 era code that
does not install today, which is why molsets is installed with ``--no-deps``.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import io
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "test", "test_scaffolds")
INSTALL_HINT = "pip install --no-deps molsets==0.3.1"


def moses_data_file(name: str) -> Path:
    """A file of the wheel's ``moses/dataset/data`` folder; ModuleNotFoundError without molsets,
    FileNotFoundError when the install lacks the file."""
    try:
        dist = importlib.metadata.distribution("molsets")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the MOSES data sets need the molsets package: {INSTALL_HINT}") from None
    path = Path(dist.locate_file(f"moses/dataset/data/{name}"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the molsets install; reinstall with: {INSTALL_HINT}")
    return path


def moses_available() -> bool:
    """Whether the MOSES split files can be read (for tests and benchmarks to skip on)."""
    try:
        for split in SPLITS:
            moses_data_file(f"{split}.csv.gz")
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


@lru_cache(maxsize=len(SPLITS))
def _read(split: str) -> tuple[str, ...]:
    with gzip.open(moses_data_file(f"{split}.csv.gz"), "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
        rows = csv.reader(text)
        column = next(rows).index("SMILES")
        return tuple(row[column] for row in rows)


def moses_smiles(split: str) -> list[str]:
    """The SMILES of one MOSES split, in file order.

    The parsed file is cached per split (the training split takes about a second to read); each call
    returns a fresh list so callers may shuffle or slice it freely.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MOSES split {split!r}; expected one of {', '.join(SPLITS)}")
    return list(_read(split))
