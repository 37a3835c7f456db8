"""The MOSES benchmark metrics (Polykovskiy et al. 2020, "Molecular Sets (MOSES): A Benchmarking Platform
for Molecular Generation Models", Frontiers in Pharmacology), written from the paper's definitions.

The reference implementation (molsets 0.3.1, ``moses/metrics``) cannot be imported today (its
dependencies do not install), so these are our own; where the paper leaves a detail open we follow
that code, and say so:

- ``valid``: fraction of generated SMILES RDKit parses (the empty string counts as invalid).
- ``unique@1k`` / ``unique@10k``: distinct canonical SMILES among the first k valid molecules
  (all of them, with a logged warning, when fewer than k are valid).
- ``Novelty``: fraction of the distinct valid molecules whose canonical SMILES is not in ``train``
  (``train`` is compared as given; the MOSES files are already RDKit-canonical).
- ``FCD/Test``: Fréchet ChemNet Distance between the valid molecules and the test set, with the ``fcd``
  package's ChemNet; both sides canonical SMILES (as MOSES's ``fcd_torch`` canonicalizes); NaN for
  fewer than 2 molecules on a side. It is strongly biased upwards for small sets (hundreds of
  molecules), so compare values only at MOSES's sizes (30k generated).
- ``SNN/Test``: mean over valid molecules of the highest Tanimoto similarity to any test molecule,
  Morgan fingerprints radius 2 folded to 1024 bits.
- ``Frag/Test``: cosine similarity of the BRICS fragment count vectors (``FragmentOnBRICSBonds``).
- ``Scaf/Test``: cosine similarity of the Bemis–Murcko scaffold count vectors; as in MOSES's code,
  scaffolds with fewer than 2 rings are not counted. Frag and Scaf are NaN when a side has no counts.
- ``IntDiv`` / ``IntDiv2``: ``1 - mean_i (mean_j T(i, j)^p)^(1/p)`` over all ordered pairs of valid
  molecules, self-pairs included, for p = 1 and 2. That is the code's definition, which produced the
  published numbers; the paper writes the p-th root of the overall mean instead (same for p = 1).

All but ``valid`` are computed on the valid molecules, duplicates included, as MOSES does.

Speed, measured on this project's 2 busy CPU cores with ``torch.set_num_threads(1)``, which is what
to use there (two threads spin against the other load: ChemNet ran at 126 instead of 334 molecules/s,
the Fréchet distance took 14 s instead of 0.07 s). FCD of 1,000 vs 1,000 molecules: 6 s, nearly all
ChemNet; 30k generated molecules: about 90 s; MOSES's 176k test set about 9 minutes, which
``moses_reference_stats`` (MOSES's precomputed test statistics, 4 s to load) or a kept
``reference_stats`` result avoids. SNN/Test for 30k × 176k: about 3 minutes (see
``nearest_neighbour_similarity``); IntDiv and IntDiv2 for 30k: about 55 s together; parsing,
fragments and scaffolds: about 0.6 ms a molecule.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fcd
import numpy as np
import torch
from rdkit import Chem
from rdkit.Chem import QED, Crippen, Descriptors, rdFingerprintGenerator
from rdkit.Chem.Scaffolds import MurckoScaffold

from genserve.models.molecule.chem import mol_from_smiles
from genserve.models.molecule.data import moses_data_file

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

FINGERPRINT_RADIUS = 2
FINGERPRINT_BITS = 1024
SCAFFOLD_MIN_RINGS = 2
UNIQUE_AT = (1_000, 10_000)
# Rows of Tanimoto blocks: a (QUERY_CHUNK, REF_CHUNK) float32 block is 64 MiB.
QUERY_CHUNK = 2048
REF_CHUNK = 8192
FCD_BATCH = 512

# Means over seeds from the MOSES README's table of metrics (molecularsets/moses, README.md at commit
# ffbc4dba); "Train" is the training set scored as if generated.
MOSES_REFERENCE: dict[str, dict[str, float]] = {
    "Train": {"valid": 1.0, "unique@1k": 1.0, "unique@10k": 1.0, "FCD/Test": 0.008, "SNN/Test": 0.6419,
              "Frag/Test": 1.0, "Scaf/Test": 0.9907, "IntDiv": 0.8567, "IntDiv2": 0.8508, "Novelty": 1.0},
    "CharRNN": {"valid": 0.9748, "unique@1k": 1.0, "unique@10k": 0.9994, "FCD/Test": 0.0732, "SNN/Test": 0.6015,
                "Frag/Test": 0.9998, "Scaf/Test": 0.9242, "IntDiv": 0.8562, "IntDiv2": 0.8503, "Novelty": 0.8419},
    "VAE": {"valid": 0.9767, "unique@1k": 1.0, "unique@10k": 0.9984, "FCD/Test": 0.099, "SNN/Test": 0.6257,
            "Frag/Test": 0.9994, "Scaf/Test": 0.9386, "IntDiv": 0.8558, "IntDiv2": 0.8498, "Novelty": 0.6949},
}


@dataclass(frozen=True)
class ReferenceStats:
    """What the ``/Test`` metrics need from the test set, computed once by ``reference_stats``."""

    size: int
    fcd_mu: np.ndarray  # (512,) mean ChemNet activation
    fcd_sigma: np.ndarray  # (512, 512) covariance of ChemNet activations
    fingerprints: np.ndarray  # (size, FINGERPRINT_BITS / 8) uint8, packed Morgan bits
    fragments: Counter[str]
    scaffolds: Counter[str]


def _notify(progress: Progress | None, stage: str) -> None:
    if progress is not None:
        progress(stage)


# --- fingerprints and Tanimoto ------------------------------------------------------------------


def morgan_fingerprints(mols: Sequence[Chem.Mol]) -> np.ndarray:
    """Morgan radius-2, 1024-bit fingerprints as packed bits, (len(mols), 128) uint8: 128 bytes a
    molecule, so MOSES's whole test set fits in 22 MiB."""
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=FINGERPRINT_RADIUS, fpSize=FINGERPRINT_BITS)
    packed = np.zeros((len(mols), FINGERPRINT_BITS // 8), dtype=np.uint8)
    for row, mol in enumerate(mols):
        packed[row] = np.packbits(generator.GetFingerprintAsNumPy(mol))
    return packed


def _unpack(packed: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, axis=1)).float()  # (n, FINGERPRINT_BITS)


def _tanimoto_blocks(query: np.ndarray, ref: np.ndarray) -> Iterator[tuple[slice, torch.Tensor]]:
    """All query × ref Tanimoto similarities, one (query rows, block) at a time.

    Intersections are a float32 matmul of 0/1 matrices (exact: counts stay far below 2^24), unions
    ``|a| + |b| - |a & b|``, both in place to keep one block in memory. Two empty fingerprints have
    similarity 1, as in MOSES. (``torch._int_mm`` on int8 is about 2x faster here, but it is private.)
    """
    for j in range(0, len(ref), REF_CHUNK):
        r = _unpack(ref[j:j + REF_CHUNK])  # (R, bits)
        r_count = r.sum(1)  # (R,)
        for i in range(0, len(query), QUERY_CHUNK):
            q = _unpack(query[i:i + QUERY_CHUNK])  # (Q, bits)
            both = q @ r.T  # (Q, R) intersection counts
            sim = torch.add(q.sum(1, keepdim=True), r_count)  # (Q, R) |a| + |b|
            torch.sub(sim, both, out=sim)
            torch.div(both, sim, out=sim)
            yield slice(i, i + len(q)), torch.nan_to_num_(sim, nan=1.0)


def nearest_neighbour_similarity(query: np.ndarray, ref: np.ndarray) -> float:
    """SNN: mean over ``query`` of the highest Tanimoto similarity to any ``ref`` fingerprint (packed bits).

    4,096 × 16,384 molecules take 2.1-2.3 s on the 2 busy CPU cores (one torch thread or two), so 30k
    generated × MOSES's 176k test molecules take about 170-180 s (extrapolated; mostly the matmul).
    """
    best = torch.zeros(len(query))
    for rows, sim in _tanimoto_blocks(query, ref):
        best[rows] = torch.maximum(best[rows], sim.amax(1))
    return float(best.mean())


def internal_diversity(fingerprints: np.ndarray, p: int = 1) -> float:
    """IntDiv_p: ``1 - mean_i (mean_j T(i, j)^p)^(1/p)`` over all ordered pairs, self-pairs included."""
    total = torch.zeros(len(fingerprints), dtype=torch.float64)
    for rows, sim in _tanimoto_blocks(fingerprints, fingerprints):
        total[rows] += (sim if p == 1 else sim.pow_(p)).sum(1, dtype=torch.float64)
    return float(1 - (total / len(fingerprints)).pow(1 / p).mean())


# --- fragments and scaffolds --------------------------------------------------------------------


def fragment_counts(mols: Sequence[Chem.Mol]) -> Counter[str]:
    """BRICS fragments (with their dummy-atom labels) over all molecules, as canonical SMILES counts."""
    counts: Counter[str] = Counter()
    for mol in mols:
        counts.update(Chem.MolToSmiles(Chem.FragmentOnBRICSBonds(mol)).split("."))
    return counts


def _scaffold(mol: Chem.Mol) -> str | None:
    try:
        scaffold = MurckoScaffold.GetScaffoldForMol(mol)
    except (ValueError, RuntimeError):
        return None
    if scaffold.GetRingInfo().NumRings() < SCAFFOLD_MIN_RINGS:
        return None
    return Chem.MolToSmiles(scaffold) or None


def scaffold_counts(mols: Sequence[Chem.Mol]) -> Counter[str]:
    """Bemis–Murcko scaffolds with at least ``SCAFFOLD_MIN_RINGS`` rings, as canonical SMILES counts."""
    return Counter(s for s in map(_scaffold, mols) if s is not None)


def cosine_similarity(a: Counter[str], b: Counter[str]) -> float:
    """Cosine of two count vectors keyed by name (missing keys are zero); NaN if either is empty."""
    if not a or not b:
        return math.nan
    dot = sum(count * b[key] for key, count in a.items() if key in b)
    return dot / math.sqrt(sum(c * c for c in a.values()) * sum(c * c for c in b.values()))


# --- FCD ----------------------------------------------------------------------------------------


def chemnet_statistics(smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean (512,) and covariance (512, 512) of ChemNet's penultimate activations; NaN for fewer than 2.

    ChemNet and its SMILES encoding are the ``fcd`` package's; it runs on CUDA when available (``fcd``'s
    default), else CPU, in the calling process.
    """
    if len(smiles) < 2:
        return np.full(512, math.nan), np.full((512, 512), math.nan)
    activations = fcd.get_predictions(fcd.load_ref_model(), list(smiles), batch_size=FCD_BATCH, n_jobs=0)
    act = torch.from_numpy(activations).double()  # (N, 512)
    return act.mean(0).numpy(), torch.cov(act.T).numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, ``|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½)``; NaN if either is NaN.

    ``tr (S1 S2)^½`` is taken as the sum of the square roots of the eigenvalues of the symmetric
    ``S1^½ S2 S1^½`` (the same eigenvalues as ``S1 S2``), in float64. ``fcd.calculate_frechet_distance``
    takes ``scipy.linalg.sqrtm`` of the non-symmetric product instead and agrees to about 1e-8 relative,
    but on 2 busy cores it took 1-11 s against our 0.07 s (one torch thread): OpenBLAS threads stall under load.
    """
    if np.isnan(mu1).any() or np.isnan(mu2).any():
        return math.nan
    s1, s2 = torch.from_numpy(sigma1).double(), torch.from_numpy(sigma2).double()
    eigenvalues, vectors = torch.linalg.eigh(s1)
    root1 = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T  # S1^½
    tr_covmean = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    diff = torch.from_numpy(mu1).double() - torch.from_numpy(mu2).double()
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


# --- the benchmark ------------------------------------------------------------------------------


def reference_stats(smiles: Sequence[str], progress: Progress | None = None) -> ReferenceStats:
    """Parse the test set once and compute what every ``/Test`` metric needs; unparsable entries are skipped."""
    _notify(progress, "reference: parsing")
    mols = [m for m in map(mol_from_smiles, smiles) if m is not None]
    _notify(progress, "reference: ChemNet")
    mu, sigma = chemnet_statistics([Chem.MolToSmiles(m) for m in mols])
    _notify(progress, "reference: fingerprints, fragments, scaffolds")
    return ReferenceStats(size=len(mols), fcd_mu=mu, fcd_sigma=sigma, fingerprints=morgan_fingerprints(mols),
                          fragments=fragment_counts(mols), scaffolds=scaffold_counts(mols))


def moses_reference_stats(split: str = "test") -> ReferenceStats:
    """``ReferenceStats`` of a MOSES test split from the statistics MOSES ships precomputed
    (``<split>_stats.npz`` in the molsets wheel), instead of about 9 minutes of ChemNet on one CPU core.

    They agree with ``reference_stats``: identical fingerprint bits, and every fragment and scaffold we
    spell for a 2,000-molecule sample is among MOSES's keys; on 3,000 random test molecules our mean
    ChemNet activation lies within sampling noise of MOSES's (squared distance 0.008 against an
    expected 0.012) and the covariance traces agree (37.7 against 37.4). The file holds pickled
    Counters, so it is loaded with ``allow_pickle``, from the installed package only.
    """
    if split not in ("test", "test_scaffolds"):
        raise ValueError(f"MOSES ships statistics for 'test' and 'test_scaffolds' only, got {split!r}")
    with np.load(moses_data_file(f"{split}_stats.npz"), allow_pickle=True) as npz:
        stats = npz["stats"].item()
    fingerprints = np.packbits(stats["SNN"]["fps"].astype(bool), axis=1)  # (N, 128) from (N, 1024) 0/1
    return ReferenceStats(size=len(fingerprints), fcd_mu=stats["FCD"]["mu"], fcd_sigma=stats["FCD"]["sigma"],
                          fingerprints=fingerprints, fragments=Counter(stats["Frag"]["frag"]),
                          scaffolds=Counter(stats["Scaf"]["scaf"]))


def _uniqueness(canonical: list[str], k: int) -> float:
    if len(canonical) < k:
        log.warning("unique@%d computed over only %d valid molecules", k, len(canonical))
    first = canonical[:k]
    return len(set(first)) / len(first)


def moses_metrics(generated: list[str], train: list[str] | set[str], test: list[str] | ReferenceStats,
                  progress: Progress | None = None) -> dict[str, float]:
    """The MOSES metrics of ``generated`` (see the module docstring for each key's definition).

    ``test`` is a list of SMILES or, to skip recomputing it, ``reference_stats`` of one. With no valid
    molecule at all, ``valid`` is 0 and every other metric NaN. Raises ValueError for an empty ``generated``.
    """
    if not generated:
        raise ValueError("moses_metrics needs at least one generated SMILES, got none")
    _notify(progress, "parsing")
    mols = [m for m in map(mol_from_smiles, generated) if m is not None]
    metrics = {"valid": len(mols) / len(generated)}
    if not mols:
        return metrics | dict.fromkeys(("unique@1k", "unique@10k", "FCD/Test", "SNN/Test", "Frag/Test",
                                        "Scaf/Test", "IntDiv", "IntDiv2", "Novelty"), math.nan)
    canonical = [Chem.MolToSmiles(m) for m in mols]
    metrics["unique@1k"], metrics["unique@10k"] = (_uniqueness(canonical, k) for k in UNIQUE_AT)
    ref = test if isinstance(test, ReferenceStats) else reference_stats(test, progress)
    _notify(progress, "FCD/Test")
    metrics["FCD/Test"] = frechet_distance(*chemnet_statistics(canonical), ref.fcd_mu, ref.fcd_sigma)
    _notify(progress, "SNN/Test")
    fingerprints = morgan_fingerprints(mols)
    metrics["SNN/Test"] = nearest_neighbour_similarity(fingerprints, ref.fingerprints)
    _notify(progress, "Frag/Test, Scaf/Test")
    metrics["Frag/Test"] = cosine_similarity(fragment_counts(mols), ref.fragments)
    metrics["Scaf/Test"] = cosine_similarity(scaffold_counts(mols), ref.scaffolds)
    _notify(progress, "IntDiv")
    metrics["IntDiv"] = internal_diversity(fingerprints, p=1)
    metrics["IntDiv2"] = internal_diversity(fingerprints, p=2)
    _notify(progress, "Novelty")
    train_set = train if isinstance(train, set | frozenset) else set(train)
    distinct = set(canonical)
    metrics["Novelty"] = len(distinct - train_set) / len(distinct)
    return metrics


# --- property plot ------------------------------------------------------------------------------


def _plot_values(smiles: list[str], max_molecules: int) -> dict[str, list[float]]:
    if len(smiles) > max_molecules:
        smiles = [smiles[i] for i in np.random.default_rng(0).choice(len(smiles), max_molecules, replace=False)]
    mols = [m for m in map(mol_from_smiles, smiles) if m is not None]
    return {"QED": [QED.qed(m) for m in mols], "logP (Crippen)": [Crippen.MolLogP(m) for m in mols],
            "molecular weight (g/mol)": [Descriptors.MolWt(m) for m in mols]}


def plot_property_distributions(generated: list[str], reference: list[str], path: Path,
                                max_molecules: int = 10_000) -> None:
    """One PNG with the QED, logP and molecular-weight densities of the valid generated and reference
    molecules, shared bins per panel. Each side is subsampled (seeded) to ``max_molecules``, since
    QED costs about 1 ms a molecule."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gen, ref = _plot_values(generated, max_molecules), _plot_values(reference, max_molecules)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, 3), gen, strict=True):
        bins = np.histogram_bin_edges(gen[name] + ref[name], bins=50)
        ax.hist(ref[name], bins=bins, density=True, alpha=0.5, label=f"test ({len(ref[name]):,})")
        ax.hist(gen[name], bins=bins, density=True, histtype="step", linewidth=2,
                label=f"generated ({len(gen[name]):,})")
        ax.set_title(name)
        ax.set_ylabel("density")
        ax.legend()
    fig.suptitle("Property distributions: generated vs test")
    fig.savefig(path, dpi=100)
