"""The dual-use gate: chemical weapons agents never leave a molecule endpoint.

Three tiers, each by structure, never by string (a listed agent written in any valid SMILES, with or
without stereo, charged or as a salt, is the same molecule here):

1. **Listed** (``data/cwc_agents.csv``): Schedule 1 agents and key Schedule 2 precursors of the Chemical
   Weapons Convention's Annex on Chemicals, each with its InChIKey. A molecule whose largest fragment
   has the same InChIKey connectivity block (the first 14 characters: stereo and charge ignored) is
   a hit.
2. **Family** (``FAMILIES``): SMARTS for the generic Schedule 1 definitions: alkylphosphonofluoridates
   (sarin family), phosphoramidocyanidates (tabun), phosphonothiolates with an S-2-dialkylaminoethyl
   group (V agents), alkylphosphonyl difluorides (DF), amidine phosphoramidofluoridates (the 2019
   Novichok entries), bis(2-haloethyl) sulfides and alkylamines (mustards; aryl and phosphoryl
   nitrogen mustards, which are drugs such as chlorambucil and cyclophosphamide, are left out),
   2-chlorovinyl arsines (lewisites) and alkylphosphonochloridates (chlorosarin, chlorosoman).
3. **Similar**: Morgan (radius 2, 2048 bits) Tanimoto similarity to a Schedule 1 agent at or above
   ``DEFAULT_SIMILARITY``: close analogues the SMARTS do not name. Precursors (Schedule 2B) match
   exactly only: they are small, and their fingerprints resemble common solvents.

RDKit's FilterCatalogs (PAINS, Brenk) are not used here: they flag aspirin too, so they stay
annotations (``/v1/molecules/properties`` ``alerts``), never blocks.

A request's own molecules are screened too (``check_query``): a ``similar_to`` reference that is a hit,
or a ``substructure`` pattern whose match in a listed agent covers that agent's warhead (the atoms of
its family's key pattern: P and F of a G agent, the P-S-C-C-N of a V agent, the S and a 2-chloroethyl
arm of a mustard), is refused; fragments such as "c1ccccc1", "CCO" or "P" are not.
"""

from __future__ import annotations

import contextlib
import csv
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import rdFingerprintGenerator
from rdkit.Chem.MolStandardize import rdMolStandardize

RDLogger.DisableLog("rdApp.*")  # type: ignore[attr-defined]

DEFAULT_SIMILARITY = 0.7
MAX_SMILES = 2000  # longer strings are screened by the family patterns only (fingerprints cost more)
MAX_PARSE = 20_000  # longer strings are not parsed at all: no endpoint sends or makes such a molecule
MAX_ATOMS = 500

# family: (SMARTS of the generic definition, SMARTS of its warhead for query screening)
FAMILIES: dict[str, tuple[str, str]] = {
    "g-agent": ("[PX4](=[O,S])(F)([#6])O[#6]", "P~F"),
    "tabun": ("[PX4](=[O,S])(C#N)(N([#6])[#6])O[#6]", "PC#N"),
    "v-agent": ("[PX4](=[O,S])([#6,$(O[#6])])(O[#6])S[CH2][CH2]N([#6])[#6]", "PSCCN"),
    "df": ("[PX4](=O)(F)(F)[#6]", "P(F)F"),
    "novichok": ("[PX4](=O)(F)N=C([#1,#6])N([#6])[#6]", "P(F)N=CN"),
    "chloro-g": ("[PX4](=O)(Cl)([CX4])O[CX4]", "P(Cl)OC"),
    "sulfur-mustard": ("[Cl,Br,I][CH2][CH2][SX2][CH2]*[SX2,Cl,Br,I]", "[Cl,Br,I]CCS"),
    "nitrogen-mustard": ("[Cl,Br,I][CH2][CH2][NX3;!$(N[a]);!$(N[P,S]);!$(NC=[O,S,N])][CH2][CH2][Cl,Br,I]",
                         "[Cl,Br,I]CCN"),
    "lewisite": ("[Cl,Br,I][CH]=[CH][As]", "Cl/C=C/[As]"),
}
# The sulfur-mustard family also covers the 2-chloroethyl sulfides joined by a chain (sesquimustard, T):
# two 2-haloethylthio arms anywhere in the molecule.
_HALOETHYLTHIO = Chem.MolFromSmarts("[Cl,Br,I][CH2][CH2][SX2]")


@dataclass(frozen=True)
class DualUseHit:
    reason: Literal["listed", "family", "similar"]
    agent: str  # the listed agent's name, or the family's name
    similarity: float  # 1.0 for listed and family hits


@dataclass(frozen=True)
class Agent:
    name: str
    smiles: str
    inchikey: str
    schedule: str
    family: str
    mol: Chem.Mol


def load_agents() -> list[Agent]:
    """The listed agents (``data/cwc_agents.csv``), each parsed."""
    text = resources.files("genserve.app.moderation").joinpath("data/cwc_agents.csv").read_text()
    out = []
    for row in csv.DictReader(text.splitlines()):
        mol = Chem.MolFromSmiles(row["smiles"])
        if mol is None:
            raise ValueError(f"cwc_agents.csv: {row['name']}: SMILES {row['smiles']!r} does not parse")
        out.append(Agent(row["name"], row["smiles"], row["inchikey"], row["schedule"], row["family"], mol))
    return out


class DualUseGate:
    """Thread-safe after construction (RDKit's matchers and fingerprint generators are used under a lock)."""

    def __init__(self, similarity_threshold: float = DEFAULT_SIMILARITY) -> None:
        self.threshold = similarity_threshold
        self.agents = load_agents()
        self._by_key = {a.inchikey.split("-")[0]: a for a in self.agents}
        self._families = {name: (Chem.MolFromSmarts(full), Chem.MolFromSmarts(key))
                          for name, (full, key) in FAMILIES.items()}
        self._fpgen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
        self._similar_to = [(a, self._fpgen.GetFingerprint(a.mol)) for a in self.agents
                            if a.schedule.startswith("1")]
        self._chooser = rdMolStandardize.LargestFragmentChooser()
        self._uncharger = rdMolStandardize.Uncharger()
        self._lock = threading.Lock()

    # generated molecules ----------------------------------------------------------------------
    def check(self, smiles: str) -> DualUseHit | None:
        """A molecule to send: None if it may go out. A string that is no molecule has nothing to screen."""
        if not smiles:
            return None
        mol = Chem.MolFromSmiles(smiles) if len(smiles) <= MAX_PARSE else None
        return None if mol is None else self.check_mol(mol, cheap=len(smiles) > MAX_SMILES)

    def check_mol(self, mol: Chem.Mol, cheap: bool = False) -> DualUseHit | None:
        with self._lock:
            with contextlib.suppress(Exception):  # standardisation failed: screen the molecule as it is
                mol = self._uncharger.uncharge(self._chooser.choose(mol))
            cheap = cheap or mol.GetNumAtoms() > MAX_ATOMS
            if not cheap and (agent := self._by_key.get(Chem.MolToInchiKey(mol).split("-")[0])) is not None:
                return DualUseHit("listed", agent.name, 1.0)
            if (family := self._family_of(mol)) is not None:
                return DualUseHit("family", family, 1.0)
            if cheap:
                return None
            fp = self._fpgen.GetFingerprint(mol)
            best, score = None, 0.0
            for agent, afp in self._similar_to:
                s = DataStructs.TanimotoSimilarity(fp, afp)
                if s > score:
                    best, score = agent, s
            if best is not None and score >= self.threshold:
                return DualUseHit("similar", best.name, score)
            return None

    def _family_of(self, mol: Chem.Mol) -> str | None:
        for name, (pattern, _) in self._families.items():
            if mol.HasSubstructMatch(pattern):
                return name
        if len(mol.GetSubstructMatches(_HALOETHYLTHIO)) >= 2:
            return "sulfur-mustard"
        return None

    # a request's molecules --------------------------------------------------------------------
    def check_query(self, query: str, kind: Literal["similar_to", "substructure"]) -> DualUseHit | None:
        """A request's ``similar_to`` reference (a SMILES) or ``substructure`` pattern (SMARTS or SMILES):
        a hit refuses the request. Strings RDKit cannot read are left to the endpoint's own 400."""
        as_mol = Chem.MolFromSmiles(query) if len(query) <= MAX_SMILES else None
        if as_mol is not None and (hit := self.check_mol(as_mol)) is not None:
            return hit
        if kind == "similar_to":
            return None
        pattern = Chem.MolFromSmarts(query) if len(query) <= MAX_SMILES else None
        if pattern is None:
            return None
        with self._lock:
            for agent in self.agents:
                _, key = self._families.get(agent.family, (None, None))
                if key is None:
                    continue
                warheads = [set(m) for m in agent.mol.GetSubstructMatches(key)]
                for match in agent.mol.GetSubstructMatches(pattern, maxMatches=64):
                    if any(w <= set(match) for w in warheads):
                        return DualUseHit("listed", agent.name, 1.0)
        return None
