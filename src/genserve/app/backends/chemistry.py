"""The chemistry pool: RDKit work off the event loop (its C++ releases the GIL for much of it), shared
by the molecule backends and ``/v1/molecules/properties``, which describes the caller's own molecules
with no model behind it."""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from genserve.models.molecule import chem


@functools.cache
def chemistry_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="chemistry")


async def describe_smiles(smiles: list[str], include: list[str]) -> list[dict[str, Any]]:
    """Each SMILES string as ``/v1/molecules/properties`` reports it (the item's fields)."""
    return await asyncio.get_running_loop().run_in_executor(chemistry_pool(), _describe_all, smiles, include)


def _describe_all(smiles: list[str], include: list[str]) -> list[dict[str, Any]]:
    return [_describe(i, s, include) for i, s in enumerate(smiles)]


def _describe(index: int, smiles: str, include: list[str]) -> dict[str, Any]:
    mol = chem.mol_from_smiles(smiles) if smiles.strip() else None
    if mol is None:
        return {"index": index, "input": smiles, "valid": False,
                "error": "not a valid SMILES string (RDKit could not parse it)"}
    return {"index": index, "input": smiles, "valid": True, "smiles": chem.canonical_smiles(smiles),
            "properties": chem.properties(mol) if "properties" in include else None,
            "alerts": chem.alerts(mol) if "alerts" in include else None,
            "svg": chem.svg(mol) if "svg" in include else None}
