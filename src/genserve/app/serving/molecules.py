"""Molecules: generation with constraints and honest stats, properties, and latent interpolation.

Generation samples SELFIES strings from the model in rounds, turns each into a canonical molecule,
and keeps it unless it is invalid, a repeat (``unique``), outside the constraints, or withheld by
moderation, until ``n`` are kept or ``max_samples`` strings have been drawn. Sample ``k`` of a
seeded request always comes from the same per-sequence seed, whatever the round sizes, so the same
request returns the same molecules; rounds grow with the observed acceptance rate, so an easy
request costs one round and an impossible one stops at ``max_samples``.
"""

from __future__ import annotations

import asyncio
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from genserve.app.backends.base import Backend
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import InvalidRequestError
from genserve.app.metrics import Metrics
from genserve.app.schemas.base import UsageInfo
from genserve.app.schemas.molecules import (
    GeneratedMolecule,
    GenerationStats,
    InterpolatedMolecule,
    MoleculeGenerationRequest,
    MoleculeGenerationResponse,
    MoleculeInterpolationRequest,
    MoleculeInterpolationResponse,
    MoleculePropertiesItem,
    MoleculePropertiesRequest,
    MoleculePropertiesResponse,
)
from genserve.app.serving.common import Deadline, now, request_id, response_id, seed_or_random, unless_disconnected
from genserve.app.settings import Settings
from genserve.models.molecule import chem
from genserve.models.seeding import sample_seed  # string k of a round: the request's sample sampled + k

MAX_ROUND = 1024  # strings sampled in one round at most
MIN_ROUND = 16


@dataclass
class _Tally:
    sampled: int = 0
    invalid: int = 0
    duplicates: int = 0
    rejected: int = 0
    withheld: int = 0
    drawn: int = 0  # strings the model generated, including those after the n-th kept molecule
    tokens: int = 0
    kept: list[GeneratedMolecule] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


class MoleculeServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings) -> None:
        self.manager, self.metrics, self.settings = manager, metrics, settings
        # RDKit work off the event loop; its C++ releases the GIL for much of it.
        self._chem = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                        thread_name_prefix="chemistry")

    # generation -------------------------------------------------------------------------------
    async def generate(self, body: MoleculeGenerationRequest, raw: Request) -> Any:
        backend = self.manager.get(body.model, "generation")
        compiled = _compile(body)
        cap = backend.entry.limits.max_samples
        if body.max_samples is not None and body.max_samples > cap:
            raise InvalidRequestError(f"max_samples={body.max_samples} exceeds this model's limit of {cap}.",
                                      param="max_samples")
        budget = body.max_samples or cap
        seed = seed_or_random(body.seed)
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s))
        rid = request_id(raw)

        async def run() -> MoleculeGenerationResponse:
            tally = await deadline.run(self._sample(backend, body, compiled, budget, seed, rid))
            return self._response(body, tally)

        return await unless_disconnected(raw, run())

    async def _sample(self, backend: Backend, body: MoleculeGenerationRequest, compiled: chem.CompiledConstraints,
                      budget: int, seed: int, rid: str) -> _Tally:
        tally, loop = _Tally(), asyncio.get_running_loop()
        training_set = getattr(backend, "training_set", None)
        while len(tally.kept) < body.n and tally.sampled < budget:
            count = _round_size(body.n - len(tally.kept), tally, budget)
            round_seed = sample_seed(seed, tally.sampled)
            # RDKit works on the strings the engine has finished while it samples the rest.
            work: list[asyncio.Future] = []
            stream = backend.stream_selfies(f"{rid}-{tally.sampled}", count, body.temperature, body.top_k, round_seed)
            async for item in stream:
                if isinstance(item, int):
                    tally.tokens += item
                    continue
                work.append(loop.run_in_executor(self._chem, _analyse_all, item, body, compiled, training_set))
            analysed = dict(pair for batch in await asyncio.gather(*work) for pair in batch)
            tally.drawn += count
            _select([analysed[i] for i in range(count)], body, tally)
        self._meter(body.model, tally)
        return tally

    def _response(self, body: MoleculeGenerationRequest, tally: _Tally) -> MoleculeGenerationResponse:
        stats = GenerationStats(requested=body.n, returned=len(tally.kept), sampled=tally.sampled,
                                invalid=tally.invalid, duplicates=tally.duplicates,
                                rejected_by_constraints=tally.rejected, withheld_by_moderation=tally.withheld,
                                stopped_by="n" if len(tally.kept) == body.n else "max_samples")
        return MoleculeGenerationResponse(
            id=response_id("mol"), created=now(), model=body.model, data=tally.kept, stats=stats,
            usage=UsageInfo(prompt_tokens=tally.drawn, completion_tokens=tally.tokens,
                            total_tokens=tally.drawn + tally.tokens))

    def _meter(self, model: str, tally: _Tally) -> None:
        m = self.metrics.molecules
        for outcome, count in (("returned", len(tally.kept)), ("invalid", tally.invalid),
                               ("duplicate", tally.duplicates), ("rejected", tally.rejected),
                               ("withheld", tally.withheld)):
            if count:
                m.labels(model, outcome).inc(count)
        self.metrics.molecules_sampled.labels(model).inc(tally.sampled)

    # properties -------------------------------------------------------------------------------
    async def properties(self, body: MoleculePropertiesRequest, raw: Request) -> Any:
        work = asyncio.get_running_loop().run_in_executor(self._chem, _describe_all, body)
        return await unless_disconnected(raw, work)

    # interpolation ----------------------------------------------------------------------------
    async def interpolate(self, body: MoleculeInterpolationRequest, raw: Request) -> Any:
        backend = self.manager.get(body.model, "interpolation")
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s))

        async def run() -> MoleculeInterpolationResponse:
            path = await deadline.run(backend.interpolate(body.start, body.end, body.steps, body.method))
            data = await asyncio.get_running_loop().run_in_executor(self._chem, _path_items, path, body)
            return MoleculeInterpolationResponse(created=now(), model=body.model, data=data)

        return await unless_disconnected(raw, run())


@dataclass
class _Analysis:
    """One sampled string, examined: what selection needs, and the molecule as it would be returned."""

    smiles: str | None  # None: not a molecule
    accepted: bool = False  # within the constraints
    molecule: GeneratedMolecule | None = None


def _analyse_all(items: list[tuple[int, str]], body: MoleculeGenerationRequest,
                 compiled: chem.CompiledConstraints, training_set: Any) -> list[tuple[int, _Analysis]]:
    return [(i, _analyse(s, body, compiled, training_set)) for i, s in items]


def _analyse(s: str, body: MoleculeGenerationRequest, compiled: chem.CompiledConstraints,
             training_set: Any) -> _Analysis:
    """Decodes, checks and describes one string; independent of every other string, so strings are
    analysed in whatever order the engine finishes them."""
    smiles = chem.selfies_to_smiles(s)
    mol = chem.mol_from_smiles(smiles) if smiles else None
    if mol is None:
        return _Analysis(None)
    wants_props = "properties" in body.include or compiled.constraints != chem.Constraints()
    exact = chem.properties(mol, decimals=None) if wants_props else None
    if exact is not None and not compiled.check(mol, exact):  # exact values: no rounding lets one slip
        return _Analysis(smiles)
    shown = chem.round_properties(exact) if exact is not None and "properties" in body.include else None
    return _Analysis(smiles, True, GeneratedMolecule(
        smiles=smiles, selfies=chem.smiles_to_selfies(smiles) or s, properties=shown,
        novel=None if training_set is None else smiles not in training_set,
        similarity=_round(compiled.similarity(mol)), svg=chem.svg(mol) if "svg" in body.include else None))


def _select(round_: list[_Analysis], body: MoleculeGenerationRequest, tally: _Tally) -> None:
    """Counts one round's strings in sample order, keeping at most ``n`` molecules. Strings after the
    n-th kept one count as never drawn, so the stats (and the next round's seeds) are exact."""
    for a in round_:
        if len(tally.kept) == body.n:
            break
        tally.sampled += 1
        if a.smiles is None:
            tally.invalid += 1
        elif body.unique and a.smiles in tally.seen:
            tally.duplicates += 1
        elif not a.accepted:
            tally.rejected += 1
        else:
            tally.seen.add(a.smiles)
            tally.kept.append(a.molecule)


def _compile(body: MoleculeGenerationRequest) -> chem.CompiledConstraints:
    given = body.constraints.model_dump() if body.constraints is not None else {}
    return chem.compile_constraints(chem.Constraints(**given))  # an InputError is the caller's 400


def _round_size(missing: int, tally: _Tally, budget: int) -> int:
    """Enough samples for the ``missing`` molecules at the acceptance rate seen so far (plus 20%)."""
    rate = len(tally.kept) / tally.sampled if tally.sampled else 1.0
    want = math.ceil(missing * 1.2 / max(rate, 0.01))
    return max(1, min(budget - tally.sampled, MAX_ROUND, max(MIN_ROUND, want)))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, chem.PROPERTY_DECIMALS)


def _describe_all(body: MoleculePropertiesRequest) -> MoleculePropertiesResponse:
    return MoleculePropertiesResponse(data=[_describe(i, s, body.include) for i, s in enumerate(body.smiles)])


def _describe(index: int, smiles: str, include: list[str]) -> MoleculePropertiesItem:
    mol = chem.mol_from_smiles(smiles) if smiles.strip() else None
    if mol is None:
        return MoleculePropertiesItem(index=index, input=smiles, valid=False,
                                      error="not a valid SMILES string (RDKit could not parse it)")
    return MoleculePropertiesItem(
        index=index, input=smiles, valid=True, smiles=chem.canonical_smiles(smiles),
        properties=chem.properties(mol) if "properties" in include else None,
        alerts=chem.alerts(mol) if "alerts" in include else None,
        svg=chem.svg(mol) if "svg" in include else None)


def _path_items(path: list[str], body: MoleculeInterpolationRequest) -> list[InterpolatedMolecule]:
    items = []
    for i, s in enumerate(path):
        smiles = chem.selfies_to_smiles(s)
        mol = chem.mol_from_smiles(smiles) if smiles else None
        items.append(InterpolatedMolecule(
            index=i, t=i / (len(path) - 1), smiles=smiles if mol is not None else None, selfies=s,
            properties=chem.properties(mol) if mol is not None and "properties" in body.include else None,
            svg=chem.svg(mol) if mol is not None and "svg" in body.include else None))
    return items
