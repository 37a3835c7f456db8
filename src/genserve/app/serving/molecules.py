"""Molecules: generation with constraints and honest stats, properties, and latent interpolation.

Generation asks the backend for ``n`` molecules within the constraints, drawing at most
``max_samples`` strings (the model's cap when the caller names none); the backend yields the kept
molecules and then the stats of every string drawn (``models.molecule.sampling`` says how). Serving
checks the caps, passes the molecules through ``_checked`` (where moderation's dual-use gate goes)
and builds the response. Properties describe the caller's own SMILES, with no model behind them, in
the chemistry worker processes (``backends.chemistry``), within the request's deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request

from genserve.app.backends.base import (
    Molecule,
    MoleculeBackend,
    MoleculeEvent,
    MoleculeInterpolationBackend,
    MoleculeStats,
)
from genserve.app.backends.manager import ANSWER_MARGIN_S, ModelManager
from genserve.app.errors import InvalidRequestError
from genserve.app.metrics import Metrics
from genserve.app.moderation.service import ModerationService
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
from genserve.app.tenancy import admit_modality, note_usage
from genserve.models.params import MoleculeInterpolationParams, MoleculeParams


class MoleculeServing:
    def __init__(self, manager: ModelManager, metrics: Metrics, settings: Settings,
                 moderation: ModerationService) -> None:
        self.manager, self.metrics, self.settings, self.moderation = manager, metrics, settings, moderation

    # generation -------------------------------------------------------------------------------
    async def generate(self, body: MoleculeGenerationRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "generation", MoleculeBackend)
        cap = backend.entry.limits.max_samples
        if body.max_samples is not None and body.max_samples > cap:
            raise InvalidRequestError(f"max_samples={body.max_samples} exceeds this model's limit of {cap}.",
                                      param="max_samples")
        time_cap = backend.entry.limits.max_sampling_seconds
        if body.max_seconds is not None and body.max_seconds > time_cap:
            raise InvalidRequestError(f"max_seconds={body.max_seconds} exceeds this model's limit of {time_cap}.",
                                      param="max_seconds")
        c = body.constraints
        for kind in ("similar_to", "substructure"):
            if c is not None and (query := getattr(c, kind)) is not None:
                await asyncio.to_thread(self.moderation.check_molecule_query, body.model, query, kind, raw)
        params = MoleculeParams(
            request_id=request_id(raw), n=body.n, seed=seed_or_random(body.seed), temperature=body.temperature,
            top_k=body.top_k, unique=body.unique, max_samples=body.max_samples or cap,
            constraints=body.constraints.model_dump() if body.constraints is not None else None,
            include=list(body.include))
        timeout_s = backend.entry.timeout_s(self.settings.request_timeout_s)
        # Sampling stops in time to answer with what it found, never a 504 after all that work.
        params.max_seconds = min(body.max_seconds or time_cap, max(0.1, timeout_s - ANSWER_MARGIN_S))
        deadline = Deadline.start(timeout_s, self.manager)

        async def run() -> MoleculeGenerationResponse:
            kept: list[GeneratedMolecule] = []
            stats: MoleculeStats | None = None
            async for event in deadline.stream(self._checked(body.model, backend.generate(params))):
                if isinstance(event, Molecule):
                    kept.append(GeneratedMolecule.model_validate(dataclasses.asdict(event)))
                else:
                    stats = event
            assert stats is not None, "a molecule backend ends every generation with its stats"
            self._meter(body.model, stats)
            return _response(body, kept, stats)

        return await unless_disconnected(raw, run())

    async def _checked(self, model: str, events: AsyncGenerator[MoleculeEvent]) -> AsyncGenerator[MoleculeEvent]:
        """The one point every molecule of a backend passes before the response is made of it: the
        dual-use gate. A molecule it hits is withheld (counted in ``stats.withheld_by_moderation``, not
        replaced by another sample)."""
        withheld = 0
        try:
            async for event in events:
                if isinstance(event, Molecule):
                    if await asyncio.to_thread(self.moderation.molecule_hit, model, event.smiles) is not None:
                        withheld += 1
                        continue
                elif withheld:
                    event = dataclasses.replace(event, returned=event.returned - withheld,
                                                withheld_by_moderation=event.withheld_by_moderation + withheld)
                yield event
        finally:
            await events.aclose()

    def _meter(self, model: str, stats: MoleculeStats) -> None:
        note_usage("molecule", stats.returned)
        m = self.metrics.molecules
        for outcome, count in (("returned", stats.returned), ("invalid", stats.invalid),
                               ("duplicate", stats.duplicates), ("rejected", stats.rejected_by_constraints),
                               ("withheld", stats.withheld_by_moderation)):
            if count:
                m.labels(model, outcome).inc(count)
        self.metrics.molecules_sampled.labels(model).inc(stats.sampled)

    # properties -------------------------------------------------------------------------------
    async def properties(self, body: MoleculePropertiesRequest, raw: Request) -> Any:
        await admit_modality("molecule")
        deadline = Deadline.start(self.settings.request_timeout_s, self.manager)

        async def run() -> MoleculePropertiesResponse:
            items = await deadline.run(self.manager.chemistry.describe_smiles(body.smiles, list(body.include)))
            note_usage("molecule", len(items))
            return MoleculePropertiesResponse(data=[MoleculePropertiesItem(**item) for item in items])

        return await unless_disconnected(raw, run())

    # interpolation ----------------------------------------------------------------------------
    async def interpolate(self, body: MoleculeInterpolationRequest, raw: Request) -> Any:
        backend = await self.manager.acquire(body.model, "interpolation", MoleculeInterpolationBackend)
        for param in ("start", "end"):
            await asyncio.to_thread(self.moderation.check_molecule_query, body.model, getattr(body, param),
                                    "similar_to", raw, param)
        deadline = Deadline.start(backend.entry.timeout_s(self.settings.request_timeout_s), self.manager)
        params = MoleculeInterpolationParams(start=body.start, end=body.end, steps=body.steps, method=body.method,
                                             include=list(body.include))

        async def run() -> MoleculeInterpolationResponse:
            points = await deadline.run(backend.interpolate(params))
            path = await asyncio.to_thread(self._checked_path, body.model, points)
            note_usage("molecule", len(path))
            data = [InterpolatedMolecule.model_validate({"index": i, "t": i / (len(path) - 1), "smiles": p.smiles,
                                                         "selfies": p.selfies, "properties": p.properties,
                                                         "svg": p.svg, "withheld_by_moderation": withheld})
                    for i, (p, withheld) in enumerate(path)]
            return MoleculeInterpolationResponse(created=now(), model=body.model, data=data)

        return await unless_disconnected(raw, run())

    def _checked_path(self, model: str, path: list[Molecule]) -> list[tuple[Molecule, bool]]:
        """The one point an interpolation's molecules pass before the response (interpolation's ``_checked``):
        a point the dual-use gate hits is blanked (no SMILES, SELFIES, properties or depiction)."""
        out = []
        for p in path:
            if self.moderation.molecule_hit(model, p.smiles) is not None:
                out.append((Molecule(smiles=None, selfies=""), True))
            else:
                out.append((p, False))
        return out


def _response(body: MoleculeGenerationRequest, kept: list[GeneratedMolecule],
              stats: MoleculeStats) -> MoleculeGenerationResponse:
    return MoleculeGenerationResponse(
        id=response_id("mol"), created=now(), model=body.model, data=kept,
        stats=GenerationStats(requested=stats.requested, returned=stats.returned, sampled=stats.sampled,
                              invalid=stats.invalid, duplicates=stats.duplicates,
                              rejected_by_constraints=stats.rejected_by_constraints,
                              withheld_by_moderation=stats.withheld_by_moderation, stopped_by=stats.stopped_by),
        usage=UsageInfo(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                        total_tokens=stats.prompt_tokens + stats.completion_tokens))
