"""The dual-use gate: every listed agent in every spelling is caught, its families too, and drugs,
pesticides and antidotes are not."""

from __future__ import annotations

import time

import pytest
from rdkit import Chem

from genserve.app.moderation.molecules import DEFAULT_SIMILARITY, FAMILIES, DualUseGate, load_agents

AGENTS = load_agents()
# Drugs, pesticides and an antidote that share atoms or groups with the agents and must pass.
BENIGN = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O", "caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "glyphosate": "OC(=O)CNCP(=O)(O)O", "malathion": "CCOC(=O)CC(SP(=S)(OC)OC)C(=O)OCC",
    "parathion": "CCOP(=S)(OCC)Oc1ccc(cc1)[N+](=O)[O-]", "nicotine": "CN1CCC[C@H]1c1cccnc1",
    "atropine": "CN1C2CCC1CC(C2)OC(=O)C(CO)c1ccccc1", "pralidoxime": "C[n+]1ccccc1/C=N/O",
    "neostigmine": "CN(C)C(=O)Oc1cccc(c1)[N+](C)(C)C", "chlorambucil": "OC(=O)CCCc1ccc(N(CCCl)CCCl)cc1",
    "cyclophosphamide": "ClCCN(CCCl)P1(=O)NCCCO1", "fluoxetine": "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1",
    "metformin": "CN(C)C(=N)NC(N)=N", "ciprofloxacin": "OC(=O)C1=CN(C2CC2)c2cc(N3CCNCC3)c(F)cc2C1=O",
    "omeprazole": "COc1ccc2[nH]c(nc2c1)S(=O)Cc1ncc(C)c(OC)c1C", "diazepam": "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc12",
    "sertraline": "CN[C@H]1CC[C@@H](c2ccc(Cl)c(Cl)c2)c2ccccc12", "lidocaine": "CCN(CC)CC(=O)Nc1c(C)cccc1C",
    "procaine": "CCN(CC)CCOC(=O)c1ccc(N)cc1", "diphenhydramine": "CN(C)CCOC(c1ccccc1)c1ccccc1",
    "sotalol": "CC(C)NCC(O)c1ccc(NS(C)(=O)=O)cc1", "dichlorvos": "COP(=O)(OC)OC=C(Cl)Cl",
    "fosfomycin": "C[C@@H]1O[C@@H]1P(=O)(O)O", "isopropanol": "CC(C)O", "ethanol": "CCO",
    "thiodiglycolic acid": "OC(=O)CSCC(=O)O", "cysteamine": "NCCS", "choline": "C[N+](C)(C)CCO",
}


@pytest.fixture(scope="module")
def gate() -> DualUseGate:
    return DualUseGate()


def test_every_row_parses_and_carries_rdkits_inchikey() -> None:
    assert len(AGENTS) >= 30 and len({a.name for a in AGENTS}) == len(AGENTS)
    for a in AGENTS:
        assert Chem.MolToInchiKey(a.mol) == a.inchikey, a.name
        assert a.family in FAMILIES or a.family in {"toxin", "pfib", "bz", "ql", "precursor"}, a.name


@pytest.mark.parametrize("agent", AGENTS, ids=lambda a: a.name)
def test_every_agent_is_caught_in_other_spellings(gate: DualUseGate, agent) -> None:
    mol = agent.mol
    spellings = {agent.smiles, Chem.MolToSmiles(mol), Chem.MolToSmiles(mol, kekuleSmiles=True),
                 Chem.MolToSmiles(mol, isomericSmiles=False), *Chem.MolToRandomSmilesVect(mol, 4, randomSeed=3)}
    spellings.add(Chem.MolToSmiles(Chem.AddHs(mol)))  # explicit hydrogens
    spellings.add(agent.smiles + ".[Na+].[Cl-]")  # beside a salt
    for s in spellings:
        hit = gate.check(s)
        assert hit is not None and hit.reason == "listed" and hit.agent == agent.name, (s, hit)


@pytest.mark.parametrize(("smiles", "family"), [
    ("CCOP(C)(=O)F", "g-agent"),  # O-ethyl methylphosphonofluoridate: a sarin homologue
    ("CCCOP(=O)(F)CC", "g-agent"),
    ("CCCOP(=O)(C#N)N(CC)CC", "tabun"),
    ("CCCOP(CC)(=O)SCCN(CC)CC", "v-agent"),
    ("ClCCSCCSCCSCCCl", "sulfur-mustard"),  # a longer polysulfide: two 2-chloroethylthio arms
    ("BrCCSCCBr", "sulfur-mustard"),
    ("CCCN(CCCl)CCCl", "nitrogen-mustard"),
    ("Cl/C=C/[As](C)C", "lewisite"),
    ("CCP(=O)(F)F", "df"),
    ("CCCOP(=O)(F)N=C(C)N(C)C", "novichok"),
])
def test_families_catch_unlisted_homologues(gate: DualUseGate, smiles: str, family: str) -> None:
    hit = gate.check(smiles)
    assert hit is not None and hit.reason in ("family", "listed") and (hit.reason == "listed" or hit.agent == family)


def test_drugs_pesticides_and_antidotes_pass(gate: DualUseGate) -> None:
    fpgen = gate._fpgen
    from rdkit import DataStructs

    worst = 0.0
    for name, smiles in BENIGN.items():
        assert gate.check(smiles) is None, name
        fp = fpgen.GetFingerprint(Chem.MolFromSmiles(smiles))
        worst = max(worst, max(DataStructs.TanimotoSimilarity(fp, afp) for _, afp in gate._similar_to))
    assert worst < DEFAULT_SIMILARITY - 0.1, worst  # a margin below the threshold (measured: printed)
    print(f"highest similarity of a benign molecule to a Schedule 1 agent: {worst:.3f}")


def test_queries(gate: DualUseGate) -> None:
    assert gate.check_query("CC(C)OP(C)(=O)F", "similar_to") is not None
    assert gate.check_query("FP(=O)(C)OC(C)C", "similar_to") is not None
    assert gate.check_query("CC(=O)Oc1ccccc1C(=O)O", "similar_to") is None
    for refused in ("P(=O)F", "ClCCSCCCl", "PSCCN", "P(C#N)", "ClCCS", "[As]C=CCl"):
        assert gate.check_query(refused, "substructure") is not None, refused
    for allowed in ("c1ccccc1", "C(=O)O", "P", "CCO", "[#6]", "N(C)C", "CC(C)O"):
        assert gate.check_query(allowed, "substructure") is None, allowed


def test_bad_and_huge_input_never_raises(gate: DualUseGate) -> None:
    for s in ("", "not a molecule", "C1CC", "[Xx]", "C" * 5000, "c1ccccc1" * 300, "(((("):
        gate.check(s)
        gate.check_query(s, "substructure")
        gate.check_query(s, "similar_to")


def test_a_check_takes_under_a_millisecond(gate: DualUseGate) -> None:
    """The check's own cost: the best of five rounds (as ``timeit`` measures), so that another process
    taking the cores for a while (a parallel build; the suite's servers) is not counted as the gate's."""
    drugs = list(BENIGN.values())
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            for s in drugs:
                gate.check(s)
        rounds.append((time.perf_counter() - start) / (10 * len(drugs)))
    per = min(rounds)
    print(f"dual-use check: {per * 1e6:.0f} us per molecule (rounds: {[round(r * 1e6) for r in rounds]})")
    assert per < 1e-3
