"""The molecular VAE on tiny seeded networks: weights round trip, ELBO terms, seeded decoding, interpolation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

selfies = pytest.importorskip("selfies")
pytest.importorskip("rdkit")

from genserve.models.common.interpolation import slerp  # noqa: E402
from genserve.models.molecule import vae as V  # noqa: E402
from genserve.models.molecule import vae_evaluate, vae_train  # noqa: E402
from genserve.models.molecule.data import moses_available  # noqa: E402

ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
IBUPROFEN = "CC(C)Cc1ccc(C(C)C(=O)O)cc1"
SMILES = [ASPIRIN, IBUPROFEN, "CC(=O)Nc1ccc(O)cc1", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "CN1CCC[C@H]1c1cccnc1",
          "O=C(O)c1ccccc1O", "Clc1ccc(Br)cc1F", "CCOC(=O)c1ccc(N)cc1", "C#CCN(C)S(=O)(=O)c1ccccc1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine they run many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(seed: int = 0) -> V.MolVAE:
    alphabet = sorted({t for s in SMILES for t in selfies.split_selfies(selfies.encoder(s))})
    torch.manual_seed(seed)
    config = V.MolVAEConfig(vocab=[*V.SPECIALS, *alphabet], embed_dim=16, hidden_size=32, latent_dim=8, max_len=40)
    return V.MolVAE(config).eval()


@pytest.fixture(scope="module")
def model() -> V.MolVAE:
    return tiny_model()


@pytest.fixture(scope="module")
def tokens(model: V.MolVAE) -> torch.Tensor:
    return V.encode_selfies_batch(model, [selfies.encoder(s) for s in SMILES])


def test_config_validates_and_round_trips_through_dict(model: V.MolVAE) -> None:
    assert V.MolVAEConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config
    with pytest.raises(ValueError, match="vocab must start with"):
        V.MolVAEConfig(vocab=["[C]", *V.SPECIALS])


def test_tokens_round_trip_to_canonical_smiles(model: V.MolVAE, tokens: torch.Tensor) -> None:
    assert tokens[:, 0].eq(V.BOS_ID).all() and tokens.shape[0] == len(SMILES)
    assert V.ids_to_smiles(model, tokens[0].tolist()[1:]) == V.chem.canonical_smiles(ASPIRIN)
    with pytest.raises(ValueError, match=r"\[Si\]"):
        V.encode_selfies_batch(model, ["[C][Si][C]"])


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path, model: V.MolVAE, tokens: torch.Tensor) -> None:
    V.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = V.load(tmp_path)
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        before, after = (m(tokens, torch.Generator().manual_seed(3)) for m in (model, loaded))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # logits, mu, logvar
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert loaded.decode(z) == model.decode(z)


def test_load_refuses_weights_that_do_not_match_config(tmp_path: Path, model: V.MolVAE) -> None:
    V.save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ValueError, match=r"do not match config\.json"):
        V.load(tmp_path)


def test_loss_terms_are_finite_kl_nonnegative_and_padding_ignored(model: V.MolVAE, tokens: torch.Tensor) -> None:
    total, recon, kl = model.loss(tokens, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(total) and torch.isfinite(recon) and recon > 0 and kl >= 0
    assert torch.allclose(total, recon + kl)
    free_total, _, free_kl = model.loss(tokens, beta=0.5, free_bits=10.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(free_total, recon + 0.5 * 10.0 * 8) and torch.allclose(free_kl, kl)
    one = tokens[:1, : int((tokens[0] != V.PAD_ID).sum())]
    padded = torch.cat([one, torch.full((1, 7), V.PAD_ID)], dim=1)
    losses = [model.loss(t, generator=torch.Generator().manual_seed(1)) for t in (one, padded)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*losses, strict=True))


def test_seeded_decode_is_reproducible_and_batch_independent(model: V.MolVAE) -> None:
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(5)]  # noqa: E731
    batched = model.decode(z, gens(), temperature=1.0)
    assert batched == model.decode(z, gens(), temperature=1.0)
    assert [model.decode(z[i:i + 1], [g], temperature=1.0)[0] for i, g in enumerate(gens())] == batched
    # One generator: the batch equals its rows decoded one after another with that generator.
    g = torch.Generator().manual_seed(7)
    assert model.decode(z, torch.Generator().manual_seed(7), temperature=1.0) == [
        model.decode(z[i:i + 1], g, temperature=1.0)[0] for i in range(5)]
    greedy = model.decode(z)
    assert greedy != batched  # sampling really samples
    assert [model.decode(z[i:i + 1])[0] for i in range(5)] == greedy
    assert all(len(ids) <= model.config.max_len and all(i > V.EOS_ID for i in ids) for ids in batched + greedy)
    with pytest.raises(ValueError, match="temperature"):
        model.decode(z, temperature=-1.0)


def test_slerp_hits_both_endpoints() -> None:
    """The VAE's walk: White's slerp on the raw posterior means (``norms=False``)."""
    a, b = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    path = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]), norms=False)
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[2], b, atol=1e-6)
    unit = slerp(a / a.norm(), b / b.norm(), 0.5, norms=False)
    assert torch.allclose(unit.norm(), torch.tensor(1.0))  # the great circle keeps unit vectors unit
    assert torch.allclose(slerp(a, 2 * a, 0.5, norms=False)[0], 1.5 * a)  # parallel: falls back to lerp


def test_interpolate_returns_steps_decodes_deterministically(model: V.MolVAE) -> None:
    path = V.interpolate(model, ASPIRIN, IBUPROFEN, steps=6)
    assert len(path) == 6 and all(isinstance(s, str) for s in path)
    assert V.interpolate(model, ASPIRIN, IBUPROFEN, steps=6) == path
    assert set().union(*(selfies.split_selfies(s) for s in path)) <= set(model.config.vocab)
    assert len(V.interpolate(model, ASPIRIN, IBUPROFEN, steps=2, method="lerp")) == 2


@pytest.mark.parametrize(("start", "end", "param", "match"), [
    ("C1CC(", IBUPROFEN, "start", "not a parsable molecule"),
    (ASPIRIN, "not a molecule", "end", "not a parsable molecule"),
    (ASPIRIN, "C[Si](C)(C)C", "end", r"vocabulary: \[Si\]"),
    ("C" * 60, ASPIRIN, "start", "exceed the model's max_len"),
])
def test_interpolate_names_the_bad_molecule(model: V.MolVAE, start: str, end: str, param: str, match: str) -> None:
    with pytest.raises(ValueError, match=f"{param}.*{match}") as info:
        V.interpolate(model, start, end, steps=3)
    assert info.value.param == param


def test_interpolate_rejects_bad_steps_and_method(model: V.MolVAE) -> None:
    with pytest.raises(ValueError, match="steps"):
        V.interpolate(model, ASPIRIN, IBUPROFEN, steps=1)
    with pytest.raises(ValueError, match="method"):
        V.interpolate(model, ASPIRIN, IBUPROFEN, steps=3, method="cubic")  # type: ignore[arg-type]


def test_evaluate_reports_rates_in_range(model: V.MolVAE) -> None:
    report = vae_evaluate.evaluate_vae(model, [*SMILES, "C[Si](C)(C)C"], n=6)
    assert report["heldout_molecules"] == 6 and report["prior_samples"] == 6
    assert report["heldout_neg_elbo"] == pytest.approx(report["heldout_recon"] + report["heldout_kl"])
    for key in ("reconstruction_accuracy", "prior_validity", "prior_uniqueness"):
        assert 0.0 <= report[key] <= 1.0


@pytest.mark.skipif(not moses_available(), reason="MOSES data (molsets) not installed")
def test_tiny_training_run_lowers_the_loss(tmp_path: Path) -> None:
    cfg = vae_train.MolVAETrainConfig(train_molecules=200, max_steps=30, embed_dim=16, hidden_size=32, latent_dim=8,
                              batch_size=32, lr=3e-3, warmup_steps=5, eval_every=10, heldout_molecules=100,
                              eval_molecules=20)
    report = vae_train.train_mol_vae(tmp_path, minutes=2.0, seed=0, threads=1, config=cfg)
    curve = report["loss_curve"]
    assert report["steps"] == 30 and [p["step"] for p in curve] == [10, 20, 30]
    assert curve[-1]["train_recon"] < curve[0]["train_recon"] - 5
    assert curve[-1]["heldout_recon"] < curve[0]["heldout_recon"]
    assert json.loads((tmp_path / "training_report.json").read_text())["steps"] == 30
    assert "genserve train mol-vae --minutes 2" in (tmp_path / "README.md").read_text()
    assert V.load(tmp_path).config.latent_dim == 8
