"""``/v1/molecules/*`` (genserve): generation, properties, latent interpolation."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genserve.app.deps import MoleculeServingDep
from genserve.app.routers.responses import ERRORS
from genserve.app.schemas.molecules import (
    MoleculeGenerationRequest,
    MoleculeGenerationResponse,
    MoleculeInterpolationRequest,
    MoleculeInterpolationResponse,
    MoleculePropertiesRequest,
    MoleculePropertiesResponse,
)

router = APIRouter(prefix="/v1/molecules", tags=["molecules"], responses=ERRORS)


@router.post("/generations", response_model=MoleculeGenerationResponse, response_model_exclude_none=True)
async def create_molecules(body: MoleculeGenerationRequest, request: Request,
                           molecules: MoleculeServingDep) -> MoleculeGenerationResponse | Response:
    """Samples `n` distinct molecules that satisfy `constraints`, as canonical SMILES with SELFIES,
    properties and depictions. `stats` accounts for every string sampled: fewer than `n` come back
    only when `max_samples` runs out, and `stats.stopped_by` says so."""
    return await molecules.generate(body, request)


@router.post("/properties", response_model=MoleculePropertiesResponse, response_model_exclude_none=True)
async def molecule_properties(body: MoleculePropertiesRequest, request: Request,
                              molecules: MoleculeServingDep) -> MoleculePropertiesResponse | Response:
    """Canonical SMILES, properties (QED, logP, MW, TPSA, donors, acceptors, rotatable bonds, SA
    score, Lipinski violations), PAINS and Brenk alerts and SVG depictions for each input; an
    unparsable input gets `valid: false` and an `error`, never a failed request."""
    return await molecules.properties(body, request)


@router.post("/interpolations", response_model=MoleculeInterpolationResponse, response_model_exclude_none=True)
async def interpolate_molecules(body: MoleculeInterpolationRequest, request: Request,
                                molecules: MoleculeServingDep) -> MoleculeInterpolationResponse | Response:
    """Molecules along the straight (`lerp`) or spherical (`slerp`) path between the latent codes
    of `start` and `end` in a molecular VAE."""
    return await molecules.interpolate(body, request)
