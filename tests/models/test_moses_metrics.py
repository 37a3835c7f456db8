"""MOSES metrics: hand-computable cases, agreement with RDKit's own Tanimoto, FCD ordering, the plot."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("rdkit", reason="MOSES metrics need rdkit")
pytest.importorskip("fcd", reason="FCD needs the fcd package")

from rdkit import DataStructs
from rdkit.Chem import rdFingerprintGenerator

from genserve.models.molecule import moses_metrics as mm
from genserve.models.molecule.chem import mol_from_smiles
from genserve.models.molecule.data import moses_available, moses_smiles

needs_moses = pytest.mark.skipif(not moses_available(), reason="MOSES data: pip install --no-deps molsets==0.3.1")

# Drugs with two or more rings, so each has a Murcko scaffold that MOSES counts.
DRUGS = [
    "Cn1c(=O)c2c(ncn2C)n(C)c1=O",  # caffeine
    "CN1CCC[C@H]1c1cccnc1",  # nicotine
    "O=C(O)Cc1ccccc1Nc1c(Cl)cccc1Cl",  # diclofenac
    "CC(=O)Nc1ccc(OC(=O)c2ccccc2OC(C)=O)cc1",  # benorilate
    "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21",  # diazepam
    "COc1ccc2[nH]cc(CCNC(C)=O)c2c1",  # melatonin
    "CN(C)CCCN1c2ccccc2CCc2ccccc21",  # imipramine
    "O=C(c1ccccc1)c1ccccc1O",  # 2-hydroxybenzophenone
]
KEYS = ("valid", "unique@1k", "unique@10k", "FCD/Test", "SNN/Test", "Frag/Test", "Scaf/Test", "IntDiv", "IntDiv2",
        "Novelty")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """ChemNet on a few dozen molecules gains nothing from intra-op threads, and on a busy 2-core machine
    spinning OpenMP threads make it 10-20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fingerprints(smiles: list[str]):
    return mm.morgan_fingerprints([mol_from_smiles(s) for s in smiles])


def test_validity_uniqueness_novelty_by_hand() -> None:
    generated = ["CCO", "OCC", "C(O)C", "c1ccccc1", "xyz", "C1CC", ""]
    stages: list[str] = []
    m = mm.moses_metrics(generated, train=["CCO"], test=DRUGS, progress=stages.append)
    assert tuple(m) == KEYS
    assert m["valid"] == 4 / 7
    assert m["unique@1k"] == m["unique@10k"] == 2 / 4  # ethanol three ways, benzene
    assert m["Novelty"] == 1 / 2  # of {ethanol, benzene}, ethanol is in train
    assert math.isnan(m["Scaf/Test"])  # no generated molecule has a two-ring scaffold
    assert "FCD/Test" in stages and "SNN/Test" in stages


def test_nothing_valid_and_nothing_generated() -> None:
    m = mm.moses_metrics(["xyz", ""], train=[], test=DRUGS)
    assert tuple(m) == KEYS and m["valid"] == 0
    assert all(math.isnan(v) for k, v in m.items() if k != "valid")
    with pytest.raises(ValueError, match="at least one"):
        mm.moses_metrics([], train=[], test=DRUGS)


def test_a_set_against_itself() -> None:
    m = mm.moses_metrics(DRUGS, train=set(DRUGS[:4]), test=DRUGS)
    assert m["SNN/Test"] == pytest.approx(1.0)
    assert m["Frag/Test"] == pytest.approx(1.0)
    assert m["Scaf/Test"] == pytest.approx(1.0)
    assert abs(m["FCD/Test"]) < 1e-3
    assert m["Novelty"] == 0.5
    assert 0.5 < m["IntDiv2"] < m["IntDiv"] < 1  # distinct drugs are far apart; p=2 weighs self-pairs more


def test_internal_diversity_by_hand() -> None:
    assert mm.internal_diversity(fingerprints(["CCO"] * 5), p=1) == pytest.approx(0.0, abs=1e-7)
    assert mm.internal_diversity(fingerprints(["CCO"] * 5), p=2) == pytest.approx(0.0, abs=1e-7)
    # Methane and water share no bits: the 2×2 similarity matrix is the identity.
    assert mm.internal_diversity(fingerprints(["C", "O"]), p=1) == pytest.approx(0.5)
    assert mm.internal_diversity(fingerprints(["C", "O"]), p=2) == pytest.approx(1 - math.sqrt(0.5))


def test_tanimoto_blocks_match_rdkit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mm, "QUERY_CHUNK", 3)  # several ragged blocks each way
    monkeypatch.setattr(mm, "REF_CHUNK", 5)
    query = [*DRUGS, "CCO", "c1ccccc1O"]
    ref = ["CC(=O)Oc1ccccc1C(=O)O", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", *DRUGS[::3], "CCN", "OCCO", "c1ccncc1", "CCCCCC"]
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    q_fps = [generator.GetFingerprint(mol_from_smiles(s)) for s in query]
    r_fps = [generator.GetFingerprint(mol_from_smiles(s)) for s in ref]
    snn = sum(max(DataStructs.BulkTanimotoSimilarity(f, r_fps)) for f in q_fps) / len(q_fps)
    assert mm.nearest_neighbour_similarity(fingerprints(query), fingerprints(ref)) == pytest.approx(snn, abs=1e-6)
    mean_sq = [sum(t * t for t in DataStructs.BulkTanimotoSimilarity(f, q_fps)) / len(q_fps) for f in q_fps]
    int_div2 = 1 - sum(math.sqrt(v) for v in mean_sq) / len(mean_sq)
    assert mm.internal_diversity(fingerprints(query), p=2) == pytest.approx(int_div2, abs=1e-6)


def test_cosine_similarity_by_hand() -> None:
    from collections import Counter

    assert mm.cosine_similarity(Counter(a=1, b=1), Counter(a=2)) == pytest.approx(1 / math.sqrt(2))
    assert mm.cosine_similarity(Counter(a=3), Counter(b=1)) == 0
    assert math.isnan(mm.cosine_similarity(Counter(), Counter(a=1)))


def test_reference_rows_use_our_keys() -> None:
    assert set(mm.MOSES_REFERENCE) == {"Train", "CharRNN", "VAE"}
    for row in mm.MOSES_REFERENCE.values():
        assert tuple(row) == KEYS


def test_frechet_distance_matches_the_fcd_package() -> None:
    import fcd
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8)) + 1
    stats = (x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert mm.frechet_distance(*stats) == pytest.approx(fcd.calculate_frechet_distance(*stats), rel=1e-9)
    assert mm.frechet_distance(*stats[:2], *stats[:2]) == pytest.approx(0, abs=1e-9)
    assert math.isnan(mm.frechet_distance(*mm.chemnet_statistics(["CCO"]), *stats[:2]))


@needs_moses
def test_fcd_separates_distributions() -> None:
    test = moses_smiles("test")
    a, b = test[:40], test[80_000:80_040]  # small sets keep ChemNet to seconds; FCD's small-sample bias is large
    chains = ["C" * n for n in range(1, 21)] + ["C" * n + "O" for n in range(1, 21)]
    stats_a = mm.chemnet_statistics(a)
    assert abs(mm.frechet_distance(*stats_a, *stats_a)) < 1e-3
    same_source = mm.frechet_distance(*stats_a, *mm.chemnet_statistics(b))
    different = mm.frechet_distance(*stats_a, *mm.chemnet_statistics(chains))
    assert 0 < same_source < different


@needs_moses
def test_shipped_moses_statistics_match_ours() -> None:
    ref = mm.moses_reference_stats("test")
    sample = moses_smiles("test")[:300]
    mols = [mol_from_smiles(s) for s in sample]
    assert ref.size == len(moses_smiles("test"))
    assert (mm.morgan_fingerprints(mols) == ref.fingerprints[:300]).all()
    assert set(mm.fragment_counts(mols)) <= set(ref.fragments)
    assert set(mm.scaffold_counts(mols)) <= set(ref.scaffolds)
    assert ref.fcd_mu.shape == (512,) and ref.fcd_sigma.shape == (512, 512)


def test_property_plot_is_a_png(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "props.png"
    mm.plot_property_distributions([*DRUGS, "not a molecule"], DRUGS[:5], path, max_molecules=6)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1500, 450)
