"""Molecule generation by rounds: what to draw next, and what to keep of what was drawn.

A request samples SELFIES strings in rounds, turns each into a canonical molecule, and keeps it
unless it is invalid, a repeat (``unique``), or outside the constraints, until ``n`` are kept or
``max_samples`` strings have been drawn. String ``k`` of a request always comes from the same
per-sequence seed (``round_seed``), whatever the round sizes, so the same request returns the same
molecules; rounds grow with the observed acceptance rate (``round_size``), so an easy request costs
one round and an impossible one stops at ``max_samples``. The sampler that draws the strings is the
caller's (the text engine, in ``app.backends.local_molecule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from genserve.models.molecule import chem
from genserve.models.molecule.generator import TrainingSet
from genserve.models.seeding import sample_seed  # string k of a round: the engine's sample k

MAX_ROUND = 1024  # strings sampled in one round at most
MIN_ROUND = 16


@dataclass
class Candidate:
    """One sampled string, examined: what selection needs, and the molecule as it would be returned."""

    smiles: str | None  # None: not a molecule
    accepted: bool = False  # within the constraints
    selfies: str = ""
    properties: dict[str, float | int] | None = None
    novel: bool | None = None
    similarity: float | None = None
    svg: str | None = None


@dataclass
class Tally:
    """Every string drawn for one request, accounted for."""

    sampled: int = 0
    invalid: int = 0
    duplicates: int = 0
    rejected: int = 0
    drawn: int = 0  # strings the model generated, including those after the n-th kept molecule
    tokens: int = 0
    kept: list[Candidate] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


def compile_constraints(given: dict | None) -> chem.CompiledConstraints:
    """The request's ``constraints``, checked and compiled (``InputError`` names the field)."""
    return chem.compile_constraints(chem.Constraints(**(given or {})))


def round_seed(seed: int, tally: Tally) -> int:
    """The seed of the next round's first string: string ``k`` of a request has seed ``seed + k * stride``."""
    return sample_seed(seed, tally.sampled)


def round_size(missing: int, tally: Tally, budget: int) -> int:
    """Enough samples for the ``missing`` molecules at the acceptance rate seen so far (plus 20%)."""
    rate = len(tally.kept) / tally.sampled if tally.sampled else 1.0
    want = math.ceil(missing * 1.2 / max(rate, 0.01))
    return max(1, min(budget - tally.sampled, MAX_ROUND, max(MIN_ROUND, want)))


def analyse_all(items: list[tuple[int, str]], include: list[str], compiled: chem.CompiledConstraints,
                training_set: TrainingSet | None) -> list[tuple[int, Candidate]]:
    return [(i, analyse(s, include, compiled, training_set)) for i, s in items]


def analyse(s: str, include: list[str], compiled: chem.CompiledConstraints,
            training_set: TrainingSet | None) -> Candidate:
    """Decodes, checks and describes one string; independent of every other string, so strings are
    analysed in whatever order the sampler finishes them."""
    smiles = chem.selfies_to_smiles(s)
    mol = chem.mol_from_smiles(smiles) if smiles else None
    if smiles is None or mol is None:
        return Candidate(None)
    wants_props = "properties" in include or compiled.constraints != chem.Constraints()
    exact = chem.properties(mol, decimals=None) if wants_props else None
    if exact is not None and not compiled.check(mol, exact):  # exact values: no rounding lets one slip
        return Candidate(smiles)
    similarity = compiled.similarity(mol)
    return Candidate(
        smiles, True, selfies=chem.smiles_to_selfies(smiles) or s,
        properties=chem.round_properties(exact) if exact is not None and "properties" in include else None,
        novel=None if training_set is None else smiles not in training_set,
        similarity=None if similarity is None else round(similarity, chem.PROPERTY_DECIMALS),
        svg=chem.svg(mol) if "svg" in include else None)


def select(round_: list[Candidate], n: int, unique: bool, tally: Tally) -> list[Candidate]:
    """Counts one round's strings in sample order, keeping at most ``n`` molecules in all; returns the
    ones kept from this round. Strings after the n-th kept one count as never drawn, so the stats
    (and the next round's seeds) are exact."""
    kept = []
    for c in round_:
        if len(tally.kept) == n:
            break
        tally.sampled += 1
        if c.smiles is None:
            tally.invalid += 1
        elif unique and c.smiles in tally.seen:
            tally.duplicates += 1
        elif not c.accepted:
            tally.rejected += 1
        else:
            tally.seen.add(c.smiles)
            tally.kept.append(c)
            kept.append(c)
    return kept


def path_molecule(s: str, include: list[str]) -> Candidate:
    """One point of a latent path (``smiles`` None where the decoder gave no molecule)."""
    smiles = chem.selfies_to_smiles(s)
    mol = chem.mol_from_smiles(smiles) if smiles else None
    if mol is None:
        return Candidate(None, selfies=s)
    return Candidate(smiles, True, selfies=s, properties=chem.properties(mol) if "properties" in include else None,
                     svg=chem.svg(mol) if "svg" in include else None)
