"""``POST /v1/molecules/generations``, ``/v1/molecules/properties``, ``/v1/molecules/interpolations``
(genserve's own endpoints: no OpenAI equivalent)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel, PositiveTemperature, Seed, UsageInfo
from genserve.models.molecule.chem import MAX_ATOMS, MAX_SMILES_CHARS, size_problem


def _small_enough(text: str) -> str:
    problem = size_problem(text)
    if problem is not None:
        raise ValueError(f"the molecule {problem}")
    return text


# A caller's SMILES or SMARTS: small enough for RDKit (models/molecule/chem.py says why and how much).
Molecule = Annotated[str, AfterValidator(_small_enough),
                     Field(description=f"at most {MAX_SMILES_CHARS} characters and {MAX_ATOMS} atoms")]

Include = Literal["properties", "svg"]
PropertyInclude = Literal["properties", "alerts", "svg"]

GENERATION_EXAMPLE: JsonDict = {"model": "genserve-mol", "n": 10, "temperature": 1.0, "seed": 7,
                                "constraints": {"qed_min": 0.6, "substructure": "c1ccccc1"},
                                "include": ["properties"]}
PROPERTIES_EXAMPLE: JsonDict = {"smiles": ["CC(=O)Oc1ccccc1C(=O)O", "not a molecule"],
                                "include": ["properties", "alerts"]}
INTERPOLATION_EXAMPLE: JsonDict = {"model": "genserve-mol-vae", "start": "CC(=O)Oc1ccccc1C(=O)O",
                                   "end": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "steps": 8}


def _properties() -> list[Include]:
    return ["properties"]


def _properties_and_alerts() -> list[PropertyInclude]:
    return ["properties", "alerts"]


class Constraints(OpenAIBaseModel):
    """Every returned molecule satisfies all given bounds (inclusive), recomputed with RDKit."""

    qed_min: float | None = Field(None, ge=0, le=1, description="quantitative estimate of drug-likeness")
    mw_min: float | None = Field(None, ge=0, description="average molecular weight, Da")
    mw_max: float | None = Field(None, gt=0)
    logp_min: float | None = Field(None, description="Crippen logP")
    logp_max: float | None = None
    tpsa_max: float | None = Field(None, ge=0, description="topological polar surface area, Å²")
    substructure: Molecule | None = Field(None, min_length=1, description="SMARTS the molecule must contain")
    similar_to: Molecule | None = Field(None, min_length=1, description="reference SMILES")
    similarity_min: float | None = Field(None, ge=0, le=1, description="Tanimoto similarity to similar_to "
                                         "(Morgan radius-2, 2048-bit fingerprints)")


class MoleculeGenerationRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [GENERATION_EXAMPLE]})

    model: str
    n: int = Field(1, ge=1, le=1000, description="molecules to return")
    temperature: float = PositiveTemperature
    top_k: int = Field(0, ge=0, description="0: the whole vocabulary")
    seed: Seed | None = Field(None, description="same seed and parameters: same molecules")
    unique: bool = Field(True, description="no molecule (canonical SMILES) twice in one response")
    constraints: Constraints | None = None
    max_samples: int | None = Field(None, ge=1, description="stop after sampling this many; default and "
                                    "cap are the model's limits")
    max_seconds: float | None = Field(None, gt=0, description="stop sampling after this long and return what "
                                      "was found (stats.stopped_by 'time'); default and cap: the model's "
                                      "limits.max_sampling_seconds, and always within the request's deadline")
    include: list[Include] = Field(default_factory=_properties)
    user: str | None = None

    @field_validator("max_samples")
    @classmethod
    def _max_samples(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value < n:
            raise ValueError(f"max_samples ({value}) is smaller than n ({n})")
        return value


class MoleculeProperties(OpenAIBaseModel):
    qed: float
    logp: float
    mw: float
    tpsa: float
    hbd: int
    hba: int
    rotatable_bonds: int
    sa_score: float = Field(description="synthetic accessibility, 1 (easy) to 10 (hard), Ertl & Schuffenhauer")
    lipinski_violations: int


class GeneratedMolecule(OpenAIBaseModel):
    smiles: str = Field(description="canonical SMILES (RDKit)")
    selfies: str = Field(description="SELFIES of the canonical molecule")
    properties: MoleculeProperties | None = None
    novel: bool | None = Field(None, description="not in the model's training set (null if unknown)")
    similarity: float | None = Field(None, description="Tanimoto similarity to constraints.similar_to")
    svg: str | None = None


class GenerationStats(OpenAIBaseModel):
    requested: int
    returned: int
    sampled: int = Field(description="strings the model generated")
    invalid: int = Field(description="sampled strings that are no molecule")
    duplicates: int = Field(description="valid molecules dropped as repeats (unique=true)")
    rejected_by_constraints: int
    withheld_by_moderation: int
    stopped_by: Literal["n", "max_samples", "time"] = Field(description="why sampling stopped: n found, "
                                                            "max_samples drawn, or max_seconds spent")


class MoleculeGenerationResponse(OpenAIBaseModel):
    id: str
    object: Literal["molecule.generation"] = "molecule.generation"
    created: int
    model: str
    data: list[GeneratedMolecule]
    stats: GenerationStats
    usage: UsageInfo


class MoleculePropertiesRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [PROPERTIES_EXAMPLE]})

    smiles: list[Molecule] = Field(min_length=1, max_length=1000)
    include: list[PropertyInclude] = Field(default_factory=_properties_and_alerts)


class StructuralAlert(OpenAIBaseModel):
    catalog: str
    description: str


class MoleculePropertiesItem(OpenAIBaseModel):
    index: int
    input: str
    valid: bool
    smiles: str | None = None
    properties: MoleculeProperties | None = None
    alerts: list[StructuralAlert] | None = None
    svg: str | None = None
    error: str | None = Field(None, description="why the input is not a molecule")


class MoleculePropertiesResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[MoleculePropertiesItem]


class MoleculeInterpolationRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [INTERPOLATION_EXAMPLE]})

    model: str
    start: Molecule = Field(min_length=1, description="SMILES")
    end: Molecule = Field(min_length=1, description="SMILES")
    steps: int = Field(8, ge=2, le=64, description="points on the path, both ends included")
    method: Literal["slerp", "lerp"] = "slerp"
    include: list[Include] = Field(default_factory=_properties)


class InterpolatedMolecule(OpenAIBaseModel):
    index: int
    t: float = Field(description="position on the path, 0 (start) to 1 (end)")
    smiles: str | None = Field(description="canonical SMILES; null where the decoder gave no molecule or "
                               "moderation withheld it")
    selfies: str = Field(description="the point's SELFIES; empty where moderation withheld it")
    properties: MoleculeProperties | None = None
    svg: str | None = None
    withheld_by_moderation: bool = Field(False, description="the point decodes to a chemical weapons agent or "
                                         "precursor (CWC Schedule 1/2, or close to one): nothing of it is shown")


class MoleculeInterpolationResponse(OpenAIBaseModel):
    object: Literal["molecule.interpolation"] = "molecule.interpolation"
    created: int
    model: str
    data: list[InterpolatedMolecule]
