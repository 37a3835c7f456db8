"""Measures of the molecular VAE (``vae.py``): the held-out ELBO, reconstruction accuracy, and the
validity and uniqueness of decodes of prior samples."""

from __future__ import annotations

import selfies
import torch

from genserve.models.molecule import chem
from genserve.models.molecule.vae import MolVAE, MolVAEConfig, encode_selfies_batch, ids_to_smiles, selfies_ids


def encodable(config: MolVAEConfig, smiles: list[str]) -> tuple[list[str], list[str]]:
    """(SMILES, SELFIES) of the molecules the model can encode, in order."""
    kept: tuple[list[str], list[str]] = ([], [])
    for smi in smiles:
        try:
            s = selfies.encoder(smi)
            selfies_ids(config, s)
        except (selfies.EncoderError, ValueError):
            continue
        kept[0].append(smi)
        kept[1].append(s)
    return kept


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def heldout_elbo(model: MolVAE, selfies_list: list[str], seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """(recon, kl) in nats per molecule, one seeded posterior sample each; their sum is the negative ELBO."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    recon = kl = 0.0
    for chunk in chunks(selfies_list, batch_size):
        _, r, k = model.loss(encode_selfies_batch(model, chunk).to(device), generator=generator)
        recon, kl = recon + r.item() * len(chunk), kl + k.item() * len(chunk)
    model.train(was_training)
    return recon / len(selfies_list), kl / len(selfies_list)


@torch.no_grad()
def evaluate_vae(model: MolVAE, test_smiles: list[str], n: int, seed: int = 0, batch_size: int = 256) -> dict:
    """Held-out quality on the first ``n`` of ``test_smiles`` the model can encode, and on ``n`` prior samples.

    heldout_recon / heldout_kl / heldout_neg_elbo: nats per molecule (one seeded posterior sample);
    reconstruction_accuracy: fraction whose greedy decode of mu has the input's canonical SMILES;
    prior_validity: fraction of greedy decodes of z ~ N(0, I) that are a non-empty molecule;
    prior_uniqueness: distinct canonical SMILES among those valid decodes, as a fraction of them.
    """
    smiles, selfies_list = (x[:n] for x in encodable(model.config, test_smiles))
    if not smiles:
        raise ValueError("none of test_smiles can be encoded by the model")
    recon, kl = heldout_elbo(model, selfies_list, seed, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    for smi_chunk, sf_chunk in zip(chunks(smiles, batch_size), chunks(selfies_list, batch_size), strict=True):
        mu = model.encode(encode_selfies_batch(model, sf_chunk).to(device))
        decoded = [ids_to_smiles(model, ids) for ids in model.decode(mu)]
        hits += sum(d is not None and d == chem.canonical_smiles(s) for d, s in zip(decoded, smi_chunk, strict=True))
    z = torch.randn(n, model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    prior = [ids_to_smiles(model, ids) for chunk in z.split(batch_size)
             for ids in model.decode(chunk.to(device=device, dtype=next(model.parameters()).dtype))]
    valid = [s for s in prior if s]
    model.train(was_training)
    return {"heldout_molecules": len(smiles), "heldout_recon": recon, "heldout_kl": kl,
            "heldout_neg_elbo": recon + kl, "reconstruction_accuracy": hits / len(smiles),
            "prior_samples": n, "prior_validity": len(valid) / n,
            "prior_uniqueness": len(set(valid)) / len(valid) if valid else 0.0}
