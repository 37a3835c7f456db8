"""Chemistry for served molecules: parsing, SELFIES, properties, constraints, structural alerts and depictions.

Everything here runs inside request handlers, so bad molecules come back as ``None`` (or ``False``)
rather than exceptions; the exceptions that remain are documented where they are raised. The only
module state is what is built once and then read: the filter catalogs, the fingerprint generator and
the SA-score module (whose fragment table loads on first use).

RDKit reports every unparsable SMILES on stderr; generated molecules are often invalid by design, so
that logging is switched off when this module is imported.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import selfies
from rdkit import Chem, DataStructs, RDConfig, RDLogger
from rdkit.Chem import QED, Crippen, Descriptors, Lipinski, rdFingerprintGenerator, rdMolDescriptors
from rdkit.Chem.Draw import rdMolDraw2D
from rdkit.Chem.FilterCatalog import FilterCatalog, FilterCatalogParams

from genserve.models.errors import InputError

RDLogger.DisableLog("rdApp.*")

PROPERTY_NAMES = ("qed", "logp", "mw", "tpsa", "hbd", "hba", "rotatable_bonds", "sa_score", "lipinski_violations")
PROPERTY_DECIMALS = 4
SIMILARITY_RADIUS = 2
SIMILARITY_BITS = 2048
SVG_SIZE_RANGE = (50, 2000)


# --- input size ---------------------------------------------------------------------------------

# What a caller's SMILES or SMARTS may hold. RDKit recurses over a molecule's atoms: a 20,000-atom chain
# overflows its stack (the process dies) and a 2,000-atom one takes 13 s to draw while holding the
# GIL, so the size is judged on the string, before RDKit sees it. Drug-like molecules have under 100
# heavy atoms; these bounds leave room for macrocycles and peptides.
MAX_SMILES_CHARS = 1000
MAX_ATOMS = 200
MAX_RING_CLOSURES = 100
MAX_BRANCH_DEPTH = 64
_BRACKET = re.compile(r"\[[^\]]*\]")
_ATOM = re.compile(r"\[[^\]]*\]|Cl|Br|[BCNOPSFIbcnopsaA*]")
_RING_CLOSURE = re.compile(r"%\d\d|\d")


def size_problem(text: str) -> str | None:
    """Why ``text``, a SMILES or SMARTS string, is too large to hand to RDKit, or None. Judged on the
    string alone (atoms: bracket atoms and organic-subset symbols; ring closures: digits outside
    brackets, two per ring; branch depth: nested parentheses)."""
    if len(text) > MAX_SMILES_CHARS:
        return f"is {len(text)} characters long; at most {MAX_SMILES_CHARS} are accepted"
    atoms = len(_ATOM.findall(text))
    if atoms > MAX_ATOMS:
        return f"has {atoms} atoms; at most {MAX_ATOMS} are accepted"
    closures = len(_RING_CLOSURE.findall(_BRACKET.sub("", text)))
    if closures > 2 * MAX_RING_CLOSURES:
        return f"opens {closures // 2} rings; at most {MAX_RING_CLOSURES} are accepted"
    depth = deepest = 0
    for char in text:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_BRANCH_DEPTH:
        return f"nests branches {deepest} deep; at most {MAX_BRANCH_DEPTH} are accepted"
    return None


# --- parsing ------------------------------------------------------------------------------------


def mol_from_smiles(smiles: str) -> Chem.Mol | None:
    """A sanitized molecule, or None for unparsable SMILES and for the empty string (which RDKit
    would read as a molecule with no atoms)."""
    if not smiles:
        return None
    return Chem.MolFromSmiles(smiles)


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical SMILES, so that different spellings of one molecule compare equal."""
    mol = mol_from_smiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def selfies_to_smiles(s: str) -> str | None:
    """Decode SELFIES and canonicalize; None when decoding fails or yields nothing parsable.

    Every SELFIES string decodes to *some* molecule, but an empty or malformed one (bad brackets,
    unknown tokens) raises inside ``selfies`` or decodes to the empty string.
    """
    try:
        smiles = selfies.decoder(s)
    except selfies.DecoderError:
        return None
    return canonical_smiles(smiles) if smiles else None


def smiles_to_selfies(smiles: str) -> str | None:
    """SELFIES of the canonical form, or None when RDKit cannot parse the SMILES or ``selfies``
    cannot express it (e.g. atoms outside its valence rules)."""
    canonical = canonical_smiles(smiles)
    if canonical is None:
        return None
    try:
        return selfies.encoder(canonical)
    except selfies.EncoderError:
        return None


# --- properties ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sascorer() -> ModuleType:
    """RDKit's Contrib ``SA_Score/sascorer.py`` (Ertl & Schuffenhauer 2009), loaded by file path because
    Contrib is shipped in the wheel but is not an importable package."""
    path = Path(RDConfig.RDContribDir) / "SA_Score" / "sascorer.py"
    spec = importlib.util.spec_from_file_location("rdkit_contrib_sascorer", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"RDKit's SA_Score contrib is missing: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sa_score(mol: Chem.Mol) -> float:
    """Synthetic accessibility, 1 (easy) to 10 (hard)."""
    return float(_sascorer().calculateScore(mol))


def properties(mol: Chem.Mol, decimals: int | None = PROPERTY_DECIMALS) -> dict[str, float | int]:
    """The ``PROPERTY_NAMES`` of one molecule, RDKit's definitions throughout.

    qed: ``QED.qed``; logp: Crippen ``MolLogP``; mw: average molecular weight (``Descriptors.MolWt``,
    g/mol); tpsa: topological polar surface area (Å²); hbd/hba: ``Lipinski.NumHDonors`` /
    ``NumHAcceptors``; rotatable_bonds: ``Lipinski.NumRotatableBonds``; sa_score: synthetic
    accessibility from 1 (easy) to 10 (hard), RDKit's Contrib SA_Score; lipinski_violations: how
    many of MW > 500, logP > 5, HBD > 5, HBA > 10 hold (Lipinski's rule of five). Floats are rounded to
    ``decimals`` places (default 4, finer than the methods' own accuracy, so responses stay short;
    None: unrounded, for checking constraints); the violation count uses the unrounded values.
    Raises ValueError for a molecule with no atoms.
    """
    if mol.GetNumAtoms() == 0:
        raise ValueError("properties of a molecule with no atoms are undefined")
    logp, mw = Crippen.MolLogP(mol), Descriptors.MolWt(mol)
    hbd, hba = Lipinski.NumHDonors(mol), Lipinski.NumHAcceptors(mol)
    floats = {"qed": QED.qed(mol), "logp": logp, "mw": mw, "tpsa": rdMolDescriptors.CalcTPSA(mol),
              "sa_score": _sa_score(mol)}
    props: dict[str, float | int] = dict(floats) if decimals is None else round_properties(floats, decimals)
    props.update(hbd=hbd, hba=hba, rotatable_bonds=Lipinski.NumRotatableBonds(mol),
                 lipinski_violations=(mw > 500) + (logp > 5) + (hbd > 5) + (hba > 10))
    return {name: props[name] for name in PROPERTY_NAMES}


def round_properties(props: dict[str, float | int], decimals: int = PROPERTY_DECIMALS) -> dict[str, float | int]:
    """``props`` with its floats rounded as responses show them."""
    return {k: round(v, decimals) if isinstance(v, float) else v for k, v in props.items()}


# --- constraints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraints:
    """What a generated molecule must satisfy; None means unconstrained.

    ``substructure`` is a SMARTS pattern the molecule must contain. ``similar_to`` and
    ``similarity_min`` require a Tanimoto similarity of at least ``similarity_min`` to the given SMILES,
    on Morgan fingerprints of radius 2 folded to 2048 bits (ECFP4-like, RDKit's ``rdFingerprintGenerator``).
    """

    qed_min: float | None = None
    mw_min: float | None = None
    mw_max: float | None = None
    logp_min: float | None = None
    logp_max: float | None = None
    tpsa_max: float | None = None
    substructure: str | None = None
    similar_to: str | None = None
    similarity_min: float | None = None


@lru_cache(maxsize=1)
def _similarity_generator() -> rdFingerprintGenerator.FingerprintGenerator64:
    return rdFingerprintGenerator.GetMorganGenerator(radius=SIMILARITY_RADIUS, fpSize=SIMILARITY_BITS)


@dataclass(frozen=True)
class CompiledConstraints:
    """``Constraints`` with the SMARTS and the reference fingerprint parsed once, for checking many molecules."""

    constraints: Constraints
    pattern: Chem.Mol | None
    reference: DataStructs.ExplicitBitVect | None

    def similarity(self, mol: Chem.Mol) -> float | None:
        """Tanimoto similarity to ``similar_to`` (Morgan r=2, 2048 bits), or None without a reference."""
        if self.reference is None:
            return None
        return DataStructs.TanimotoSimilarity(self.reference, _similarity_generator().GetFingerprint(mol))

    def check(self, mol: Chem.Mol, props: dict[str, float | int]) -> bool:
        """Whether every constraint holds; ``props`` is ``properties(mol)``. Pass unrounded ones
        (``decimals=None``), as the server does, so that a molecule passes only if its exact value does."""
        c = self.constraints
        bounds = [(c.qed_min, props["qed"], None), (c.mw_min, props["mw"], c.mw_max),
                  (c.logp_min, props["logp"], c.logp_max), (None, props["tpsa"], c.tpsa_max)]
        for low, value, high in bounds:
            if (low is not None and value < low) or (high is not None and value > high):
                return False
        if self.pattern is not None and not mol.HasSubstructMatch(self.pattern):
            return False
        if self.reference is not None and c.similarity_min is not None:
            return self.similarity(mol) >= c.similarity_min
        return True


def _check_numbers(c: Constraints) -> None:
    for name in ("qed_min", "mw_min", "mw_max", "logp_min", "logp_max", "tpsa_max", "similarity_min"):
        value = getattr(c, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"constraints.{name} must be a finite number, got {value!r}", f"constraints.{name}")
    for low, high in (("mw_min", "mw_max"), ("logp_min", "logp_max")):
        lo, hi = getattr(c, low), getattr(c, high)
        if lo is not None and hi is not None and lo > hi:
            raise InputError(f"constraints.{low} ({lo!r}) exceeds constraints.{high} ({hi!r})", f"constraints.{low}")
    for name in ("qed_min", "similarity_min"):
        value = getattr(c, name)
        if value is not None and not 0 <= value <= 1:
            raise InputError(f"constraints.{name} must lie in [0, 1], got {value!r}", f"constraints.{name}")


def _compile_pattern(smarts: str | None) -> Chem.Mol | None:
    if smarts is None:
        return None
    pattern = Chem.MolFromSmarts(smarts) if smarts.strip() else None
    if pattern is None:
        raise InputError(f"constraints.substructure is not valid SMARTS: {smarts!r}", "constraints.substructure")
    return pattern


def _compile_reference(c: Constraints) -> DataStructs.ExplicitBitVect | None:
    if c.similar_to is None:
        if c.similarity_min is not None:
            raise InputError(f"constraints.similarity_min ({c.similarity_min!r}) needs constraints.similar_to",
                             "constraints.similarity_min")
        return None
    mol = mol_from_smiles(c.similar_to)
    if mol is None:
        raise InputError(f"constraints.similar_to is not valid SMILES: {c.similar_to!r}", "constraints.similar_to")
    return _similarity_generator().GetFingerprint(mol)


def compile_constraints(c: Constraints) -> CompiledConstraints:
    """Validate ``c`` and parse its patterns once; raises InputError naming the offending field.

    Rejected: non-finite numbers, mw_min > mw_max, logp_min > logp_max, qed_min or similarity_min
    outside [0, 1], unparsable (or empty) SMARTS, unparsable similar_to SMILES, and similarity_min
    without similar_to. similar_to without similarity_min is allowed: it only asks for the similarity
    to be reported.
    """
    _check_numbers(c)
    return CompiledConstraints(c, _compile_pattern(c.substructure), _compile_reference(c))


# --- alerts and depiction -----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _alert_catalogs() -> dict[str, FilterCatalog]:
    """PAINS A+B+C (Baell & Holloway 2010) and Brenk (Brenk et al. 2008) catalogs, built once (about 0.1 s)."""
    catalogs = {}
    for name, which in (("PAINS", FilterCatalogParams.FilterCatalogs.PAINS),
                        ("Brenk", FilterCatalogParams.FilterCatalogs.BRENK)):
        params = FilterCatalogParams()
        params.AddCatalog(which)
        catalogs[name] = FilterCatalog(params)
    return catalogs


def alerts(mol: Chem.Mol) -> list[dict[str, str]]:
    """Structural alerts matched by ``mol``: ``{"catalog": "PAINS" | "Brenk", "description": ...}``, PAINS first."""
    return [{"catalog": name, "description": entry.GetDescription()}
            for name, catalog in _alert_catalogs().items() for entry in catalog.GetMatches(mol)]


def svg(mol: Chem.Mol, size: int = 300) -> str:
    """A ``size`` × ``size`` 2-D depiction as an SVG document without the XML declaration, so it embeds
    directly in HTML or JSON. Raises ValueError for sizes outside ``SVG_SIZE_RANGE``."""
    low, high = SVG_SIZE_RANGE
    if not low <= size <= high:
        raise ValueError(f"svg size must be in [{low}, {high}], got {size!r}")
    drawer = rdMolDraw2D.MolDraw2DSVG(size, size)
    rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
    drawer.FinishDrawing()
    text = drawer.GetDrawingText()
    return text[text.index("<svg"):] if text.startswith("<?xml") else text
