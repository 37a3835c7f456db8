"""``genserve train mol-vae``: the molecular VAE (``vae.py``) on a random MOSES train subset as SELFIES.

The ELBO's KL weight beta rises from 0 (Bowman et al. 2016) and each latent dimension gets a few free
nats (Kingma et al. 2016) against posterior collapse; the checkpoint with the best held-out negative
ELBO ships, with ``training_report.json`` and a model card.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import selfies
import torch

from genserve.models.common.reports import machine, write_report
from genserve.models.common.training import adamw, lr_at, set_lr, snapshot
from genserve.models.errors import InputError
from genserve.models.molecule import chem
from genserve.models.molecule.vae import PAD_ID, SPECIALS, MolVAE, MolVAEConfig, interpolate, load, save, selfies_ids
from genserve.models.molecule.vae_evaluate import encodable, evaluate_vae, heldout_elbo

log = logging.getLogger(__name__)

# Named drugs for the model card's example interpolation (all inside the MOSES element set).
EXAMPLE_PAIR = (("aspirin", "CC(=O)Oc1ccccc1C(=O)O"), ("ibuprofen", "CC(C)Cc1ccc(C(C)C(=O)O)cc1"))


@dataclass
class MolVAETrainConfig:
    minutes: float = 20.0
    train_molecules: int = 300_000  # random MOSES train subset converted to SELFIES
    max_steps: int | None = None  # stop early (tests); None trains for the whole budget
    embed_dim: int = 64
    hidden_size: int = 256
    latent_dim: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 2
    max_len: int = 72
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    beta_final: float = 0.05  # 0.5 gave KL 4.7 nats and no exact reconstructions in 30 min
    beta_warmup: float = 0.3  # fraction of the budget over which beta rises linearly from 0
    free_bits: float = 0.05  # nats per latent dimension
    eval_every: int = 250
    heldout_molecules: int = 2000  # MOSES test molecules for the held-out ELBO
    eval_molecules: int = 1000  # for reconstruction accuracy and prior samples at the end
    seed: int = 0
    threads: int = 2

    def model_config(self, vocab: list[str]) -> MolVAEConfig:
        return MolVAEConfig(vocab=vocab, embed_dim=self.embed_dim, hidden_size=self.hidden_size,
                            latent_dim=self.latent_dim, encoder_layers=self.encoder_layers,
                            decoder_layers=self.decoder_layers, max_len=self.max_len)


def beta_at(cfg: MolVAETrainConfig, progress: float) -> float:
    """KL weight: linear warm-up from 0 to ``beta_final`` over the first ``beta_warmup`` of the budget."""
    return cfg.beta_final * min(1.0, progress / cfg.beta_warmup) if cfg.beta_warmup > 0 else cfg.beta_final


def _prepare(cfg: MolVAETrainConfig, rng: random.Random) -> tuple[MolVAE, list[list[int]], list[str], list[str]]:
    """The model, training id lists and held-out (SMILES, SELFIES); the vocabulary is the training subset's."""
    from genserve.models.molecule.data import moses_smiles
    from genserve.models.molecule.train_generator import encode_selfies

    train = moses_smiles("train")
    train_selfies = encode_selfies(rng.sample(train, min(cfg.train_molecules, len(train))), processes=cfg.threads)
    train_selfies = [s for s in train_selfies if selfies.len_selfies(s) <= cfg.max_len]
    alphabet = sorted({t for s in train_selfies for t in selfies.split_selfies(s)})
    model = MolVAE(cfg.model_config([*SPECIALS, *alphabet]))
    train_ids = [selfies_ids(model.config, s) for s in train_selfies]
    test = moses_smiles("test")
    held_smiles, held_selfies = encodable(model.config, rng.sample(test, min(cfg.heldout_molecules, len(test))))
    return model, train_ids, held_smiles, held_selfies


def _fit(model: MolVAE, train_ids: list[list[int]], held_selfies: list[str], cfg: MolVAETrainConfig,
         rng: random.Random) -> dict:
    """Trains in place for the budget (or ``max_steps``); returns the best state by held-out negative ELBO,
    its step and value, the loss curve (means over each ``eval_every`` steps), steps and molecules seen."""
    from genserve.models.molecule.train_generator import batches

    opt = adamw(model, cfg.lr, cfg.weight_decay)
    best: dict = {"neg_elbo": float("inf"), "state": None, "step": 0}
    curve: list[dict] = []
    window: list[tuple[float, float, float]] = []
    step = seen = 0
    start, budget = time.time(), cfg.minutes * 60
    model.train()
    for batch in batches(train_ids, cfg.batch_size, PAD_ID, rng):
        progress = (time.time() - start) / budget
        set_lr(opt, lr_at(cfg, step, progress))
        beta = beta_at(cfg, progress)
        total, recon, kl = model.loss(batch, beta, cfg.free_bits)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step, seen = step + 1, seen + batch.shape[0]
        window.append((total.item(), recon.item(), kl.item()))
        last = step == cfg.max_steps or time.time() - start >= budget
        if step % cfg.eval_every == 0 or last:
            point = _checkpoint(model, held_selfies, best, step, window, beta, time.time() - start, cfg.seed)
            curve.append(point)
            window = []
        if last:
            break
    return {**best, "curve": curve, "steps": step, "molecules_seen": seen, "seconds": time.time() - start}


def _checkpoint(model: MolVAE, held_selfies: list[str], best: dict, step: int,
                window: list[tuple[float, float, float]], beta: float, seconds: float, seed: int) -> dict:
    """Held-out evaluation: updates ``best`` in place and returns this point of the loss curve."""
    recon, kl = heldout_elbo(model, held_selfies, seed)
    if recon + kl < best["neg_elbo"]:
        best.update(neg_elbo=recon + kl, step=step, state=snapshot(model))
    train = [sum(x[i] for x in window) / len(window) for i in range(3)]
    point = {"step": step, "seconds": round(seconds, 1), "beta": round(beta, 4), "train_loss": train[0],
             "train_recon": train[1], "train_kl": train[2], "heldout_recon": recon, "heldout_kl": kl}
    log.info("step %d  %.0fs  beta %.3f  train loss %.2f (recon %.2f, kl %.2f)  "
             "held-out -ELBO %.2f (recon %.2f, kl %.2f)", step, seconds, beta, *train, recon + kl, recon, kl)
    return point


def _example_interpolation(model: MolVAE, steps: int = 7) -> dict | None:
    (start_name, start), (end_name, end) = EXAMPLE_PAIR
    try:
        path = interpolate(model, start, end, steps)
    except InputError as e:
        log.warning("no example interpolation: %s", e)
        return None
    return {"start": start_name, "end": end_name, "start_smiles": start, "end_smiles": end, "method": "slerp",
            "smiles": [chem.selfies_to_smiles(s) or "" for s in path]}

def train_mol_vae(out: Path, minutes: float, seed: int, threads: int = 2,
                  config: MolVAETrainConfig | None = None) -> dict:
    """``genserve train mol-vae``: trains on a random MOSES train subset for ``minutes`` of optimisation
    (data preparation comes on top), keeps the checkpoint with the best held-out negative ELBO, saves it
    to ``out`` with ``training_report.json`` and a model card ``README.md``, and returns the report."""
    cfg = replace(config or MolVAETrainConfig(), minutes=minutes, seed=seed, threads=threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(out, cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out: Path, cfg: MolVAETrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    model, train_ids, held_smiles, held_selfies = _prepare(cfg, rng)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("data: %d training molecules, %d held-out, vocabulary %d, prepared in %.0fs; model %.2fM parameters",
             len(train_ids), len(held_selfies), model.config.vocab_size, time.time() - t0, n_params / 1e6)
    fit = _fit(model, train_ids, held_selfies, cfg, rng)
    model.load_state_dict(fit["state"])
    save(model, out)
    shipped = load(out)  # evaluate exactly what ships
    metrics = evaluate_vae(shipped, held_smiles, cfg.eval_molecules, cfg.seed)
    report = {"steps": fit["steps"], "best_step": fit["step"], "train_seconds": round(fit["seconds"], 1),
              "minutes_total": round((time.time() - t0) / 60, 2), "parameters": n_params,
              "file_bytes": (out / "model.safetensors").stat().st_size, "train_molecules": len(train_ids),
              "molecules_seen": fit["molecules_seen"],
              "molecules_per_second": round(fit["molecules_seen"] / max(fit["seconds"], 1e-9), 1),
              "vocab_size": model.config.vocab_size, **metrics,
              "example_interpolation": _example_interpolation(shipped),
              "loss_curve": fit["curve"], "machine": machine(cfg.threads), "config": asdict(cfg)}
    write_report(out, report, model_card(report))
    log.info("saved %s: held-out -ELBO %.2f nats (recon %.2f, kl %.2f), reconstruction %.3f, prior validity %.3f",
             out, metrics["heldout_neg_elbo"], metrics["heldout_recon"], metrics["heldout_kl"],
             metrics["reconstruction_accuracy"], metrics["prior_validity"])
    return report


def model_card(report: dict) -> str:
    """The ``README.md`` of a trained model directory, from its training report."""
    cfg = report["config"]
    example = report["example_interpolation"]
    lines = [
        "# genserve-mol-vae",
        "",
        "Molecular VAE over SELFIES for latent interpolation between two molecules (Gómez-Bombarelli et al. 2018,",
        "SELFIES by Krenn et al. 2020): bidirectional GRU encoder, GRU decoder conditioned on z; code in",
        "`models/molecule/vae.py`. Files: `config.json` (vocabulary and sizes) and `model.safetensors` (float32).",
        "",
        "## Training",
        "",
        f"- Data: a random {report['train_molecules']:,} of the MOSES train SMILES (Polykovskiy et al. 2020, from the",
        "  `molsets` wheel) as SELFIES; held-out molecules from MOSES test.",
        f"- Command: `genserve train mol-vae --minutes {cfg['minutes']:g}` (seed {cfg['seed']}).",
        f"- Time: {report['train_seconds'] / 60:.1f} min of optimisation, {report['minutes_total']:.1f} min in all;"
        f" {report['steps']} steps of {cfg['batch_size']}, {report['molecules_seen']:,} molecules"
        f" ({report['molecules_per_second']:.0f}/s); best held-out checkpoint at step {report['best_step']}.",
        f"- Machine: {report['machine']}.",
        f"- Objective: ELBO with KL weight rising to {cfg['beta_final']} over the first {cfg['beta_warmup']:.0%}"
        f" of the budget and {cfg['free_bits']} free nats per latent dimension; AdamW, lr {cfg['lr']}, clip"
        f" {cfg['grad_clip']}.",
        f"- Size: {report['parameters']:,} parameters, latent dimension {cfg['latent_dim']},"
        f" {report['file_bytes'] / 1e6:.1f} MB.",
        "",
        f"## Measured quality ({report['heldout_molecules']} held-out MOSES test molecules,"
        f" {report['prior_samples']} prior samples)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| held-out negative ELBO (nats/molecule) | {report['heldout_neg_elbo']:.2f} |",
        f"| reconstruction term (nats/molecule) | {report['heldout_recon']:.2f} |",
        f"| KL term (nats/molecule) | {report['heldout_kl']:.2f} |",
        f"| reconstruction accuracy (greedy decode of mu) | {report['reconstruction_accuracy']:.3f} |",
        f"| validity of greedy decodes of z ~ N(0, I) | {report['prior_validity']:.3f} |",
        f"| uniqueness of those valid decodes | {report['prior_uniqueness']:.3f} |",
    ]
    if example:
        lines += ["", f"## Example: {example['start']} → {example['end']} ({example['method']},"
                  f" {len(example['smiles'])} points, greedy)", "",
                  f"From `{example['start_smiles']}` to `{example['end_smiles']}`: decodes of points between the two",
                  "posterior means, so the ends equal the inputs only where the model reconstructs them.", "", "```",
                  *[f"{t}  {s or '(empty)'}" for t, s in enumerate(example["smiles"])], "```"]
    return "\n".join(lines) + "\n"
