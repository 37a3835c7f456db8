"""``selfies-llama``: a Llama decoder over SELFIES tokens, served as a molecule generator.

The network, its loading and the text engine are the Llama family's (``models.llama``); what this
family adds is what turns token strings into molecules: the start token to sample from, SELFIES to
canonical SMILES, and the training set's fingerprint to tell novel molecules from memorised ones
without shipping the data set.

The training set is shipped as ``training_set.safetensors``: the sorted 32-bit BLAKE2b hashes of its
canonical SMILES (6.3 MB for MOSES's 1.58M molecules, against about 60 MB for the SMILES). A
molecule is "not novel" when its hash is in the set; a novel molecule collides with a training hash
with probability about N / 2^32 (0.04% for MOSES), so novelty is under-reported by at most that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

# The family loads as a Llama decoder: the tokenizer and limits (gateway side), the weights (engine).
from genserve.models.llama import load, load_info

__all__ = ["TRAINING_SET_FILE", "TrainingSet", "load", "load_info", "save_training_set", "smiles_hash"]

TRAINING_SET_FILE = "training_set.safetensors"


def smiles_hash(canonical: str) -> int:
    return int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=4).digest(), "little")


def save_training_set(canonical_smiles: Iterable[str], out: Path) -> int:
    """Writes the sorted unique hashes of ``canonical_smiles``; returns how many."""
    hashes = np.unique(np.fromiter((smiles_hash(s) for s in canonical_smiles), dtype=np.uint32))
    save_file({"hashes": hashes}, str(out / TRAINING_SET_FILE), metadata={"hash": "blake2b-32 of canonical SMILES"})
    return len(hashes)


class TrainingSet:
    """Membership of canonical SMILES in the training set, from the shipped hashes."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = hashes

    @classmethod
    def load(cls, model_dir: Path) -> TrainingSet | None:
        path = model_dir / TRAINING_SET_FILE
        return cls(load_file(str(path))["hashes"]) if path.is_file() else None

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, canonical: str) -> bool:
        h = smiles_hash(canonical)
        i = int(np.searchsorted(self.hashes, h))
        return i < len(self.hashes) and int(self.hashes[i]) == h


def make_tiny(path: Path) -> None:
    """A tiny seeded SELFIES decoder with the shipped genserve-mol tokenizer and a two-molecule training
    set, saved in ``path`` (the contract test's instance)."""
    from genserve.models.common.loading import weights_dir
    from genserve.models.llama import make_tiny as make_tiny_llama

    make_tiny_llama(path, tokenizer_from=weights_dir() / "genserve-mol")
    save_training_set(["CCO", "c1ccccc1"], path)
