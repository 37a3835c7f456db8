"""Chemistry helpers: canonical SMILES, SELFIES, properties, constraints, alerts and depictions."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("rdkit", reason="molecule chemistry needs rdkit")
pytest.importorskip("selfies", reason="molecule chemistry needs selfies")

from rdkit import Chem

from genserve.models.errors import InputError
from genserve.models.molecule.chem import (
    PROPERTY_NAMES,
    Constraints,
    alerts,
    canonical_smiles,
    compile_constraints,
    mol_from_smiles,
    properties,
    selfies_to_smiles,
    smiles_to_selfies,
    svg,
)

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "Cn1c(=O)c2c(ncn2C)n(C)c1=O"
IBUPROFEN = "CC(C)Cc1ccc(C(C)C(=O)O)cc1"
# Erythromycin A: 18 stereocentres and a macrocycle, the kind of molecule SA scores as hard.
ERYTHROMYCIN = ("CC[C@H]1OC(=O)[C@H](C)[C@@H](O[C@H]2C[C@@](C)(OC)[C@@H](O)[C@H](C)O2)[C@H](C)[C@@H]"
                "(O[C@@H]2O[C@H](C)C[C@H](N(C)C)[C@H]2O)[C@](C)(O)C[C@@H](C)C(=O)[C@H](C)[C@@H](O)[C@]1(C)O")
# A C40 fatty-acyl tetra-serine: MW 955, Crippen logP 9.2, 9 donors, 9 acceptors.
GREASY_PEPTIDE = "C" * 40 + "C(=O)NC(CO)C(=O)NC(CO)C(=O)NC(CO)C(=O)NC(CO)C(=O)O"
RHODANINE_ENE = "O=C1NC(=S)SC1=Cc1ccccc1"  # 5-benzylidene rhodanine, PAINS family ene_rhod_A


def test_canonical_smiles_identifies_spellings_and_rejects_garbage() -> None:
    assert canonical_smiles("OCC") == canonical_smiles("C(O)C") == "CCO"
    assert canonical_smiles("C1=CC=CC=C1") == canonical_smiles("c1ccccc1") == "c1ccccc1"
    for bad in ("", "C1CC", "xyz", "C(C", "c1cccc1"):
        assert canonical_smiles(bad) is None
        assert mol_from_smiles(bad) is None


@pytest.mark.parametrize("smiles", [ASPIRIN, CAFFEINE, IBUPROFEN, "C[C@H](N)C(=O)O", "[Na+].[Cl-]"])
def test_selfies_round_trip(smiles: str) -> None:
    encoded = smiles_to_selfies(smiles)
    assert encoded is not None and encoded.startswith("[")
    assert selfies_to_smiles(encoded) == canonical_smiles(smiles)


def test_selfies_failures_are_none() -> None:
    assert smiles_to_selfies("C1CC") is None
    assert smiles_to_selfies("") is None
    for bad in ("", "[C", "[Xyz]", "not selfies"):
        assert selfies_to_smiles(bad) is None
    assert selfies_to_smiles("[C][C][O]") == "CCO"


def test_aspirin_properties_match_rdkit_definitions() -> None:
    props = properties(mol_from_smiles(ASPIRIN))
    assert tuple(props) == PROPERTY_NAMES
    assert props["mw"] == pytest.approx(180.159, abs=1e-3)
    assert props["tpsa"] == pytest.approx(63.6, abs=1e-3)
    assert props["logp"] == pytest.approx(1.3101, abs=1e-4)
    assert props["qed"] == pytest.approx(0.5501, abs=1e-4)
    assert (props["hbd"], props["hba"], props["rotatable_bonds"], props["lipinski_violations"]) == (1, 3, 2, 0)
    for name in ("hbd", "hba", "rotatable_bonds", "lipinski_violations"):
        assert type(props[name]) is int
    for name in ("qed", "logp", "mw", "tpsa", "sa_score"):
        assert round(props[name], 4) == props[name]


def test_lipinski_violations_count_each_rule() -> None:
    props = properties(mol_from_smiles(GREASY_PEPTIDE))
    assert props["mw"] > 500 and props["logp"] > 5 and props["hbd"] > 5 and props["hba"] <= 10
    assert props["lipinski_violations"] == 3


def test_sa_score_ranks_easy_below_hard() -> None:
    scores = {s: properties(mol_from_smiles(s))["sa_score"] for s in (ASPIRIN, CAFFEINE, IBUPROFEN, ERYTHROMYCIN)}
    assert all(1 <= v <= 10 for v in scores.values())
    assert scores[ASPIRIN] < 2.5 and scores[ERYTHROMYCIN] > 5


def test_properties_of_an_empty_molecule_raise() -> None:
    with pytest.raises(ValueError, match="no atoms"):
        properties(Chem.Mol())


@pytest.mark.parametrize(("constraints", "param", "bad_value"), [
    (Constraints(substructure="[C"), "constraints.substructure", "[C"),
    (Constraints(substructure=""), "constraints.substructure", "''"),
    (Constraints(similar_to="C1CC", similarity_min=0.5), "constraints.similar_to", "C1CC"),
    (Constraints(similarity_min=0.4), "constraints.similarity_min", "0.4"),
    (Constraints(similar_to="CCO", similarity_min=1.5), "constraints.similarity_min", "1.5"),
    (Constraints(mw_min=400, mw_max=300), "constraints.mw_min", "400"),
    (Constraints(logp_min=3, logp_max=-1), "constraints.logp_min", "3"),
    (Constraints(qed_min=float("nan")), "constraints.qed_min", "nan"),
])
def test_constraint_errors_name_the_field(constraints: Constraints, param: str, bad_value: str) -> None:
    with pytest.raises(InputError) as info:
        compile_constraints(constraints)
    assert info.value.param == param
    assert bad_value in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("constraints", "accepted"), [
    (Constraints(), True),
    (Constraints(qed_min=0.55), True),
    (Constraints(qed_min=0.56), False),
    (Constraints(mw_min=180, mw_max=181), True),
    (Constraints(mw_max=180), False),
    (Constraints(logp_min=1.5), False),
    (Constraints(tpsa_max=60), False),
    (Constraints(substructure="c1ccccc1OC(=O)C"), True),  # the acetylated phenol
    (Constraints(substructure="C(=O)N"), False),  # no amide
    (Constraints(similar_to="OC(=O)c1ccccc1OC(C)=O", similarity_min=1.0), True),  # aspirin, other spelling
    (Constraints(similar_to=CAFFEINE, similarity_min=0.3), False),
    (Constraints(similar_to=CAFFEINE), True),  # a reference alone only reports similarity
])
def test_constraints_accept_and_reject_aspirin(constraints: Constraints, accepted: bool) -> None:
    mol = mol_from_smiles(ASPIRIN)
    assert compile_constraints(constraints).check(mol, properties(mol)) is accepted


def test_similarity_is_tanimoto_on_morgan_2048() -> None:
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    expected = DataStructs.TanimotoSimilarity(generator.GetFingerprint(mol_from_smiles(IBUPROFEN)),
                                              generator.GetFingerprint(mol_from_smiles(ASPIRIN)))
    compiled = compile_constraints(Constraints(similar_to=IBUPROFEN))
    assert compiled.similarity(mol_from_smiles(ASPIRIN)) == pytest.approx(expected)
    assert 0 < expected < 0.5
    assert compiled.similarity(mol_from_smiles(IBUPROFEN)) == 1.0
    assert compile_constraints(Constraints()).similarity(mol_from_smiles(ASPIRIN)) is None


def test_alerts_flag_pains_and_brenk() -> None:
    found = alerts(mol_from_smiles(RHODANINE_ENE))
    assert {"catalog": "PAINS", "description": "ene_rhod_A(235)"} in found
    assert {a["catalog"] for a in found} == {"PAINS", "Brenk"}
    assert alerts(mol_from_smiles("CCO")) == []
    assert [a["catalog"] for a in alerts(mol_from_smiles(ASPIRIN))] == ["Brenk"]  # phenol ester, not PAINS


def test_svg_is_a_parsable_document() -> None:
    text = svg(mol_from_smiles(CAFFEINE), size=240)
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (root.get("width"), root.get("height")) == ("240px", "240px")
    assert not text.startswith("<?xml")
    with pytest.raises(ValueError, match="svg size"):
        svg(mol_from_smiles(CAFFEINE), size=0)
