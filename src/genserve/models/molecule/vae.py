"""``genserve-mol-vae``: a molecular variational autoencoder over SELFIES, for latent interpolation.

Gómez-Bombarelli et al. 2018, "Automatic chemical design using a data-driven continuous representation
of molecules" (ACS Central Science 4, 268): an encoder maps a molecule string to a Gaussian posterior
q(z | x) = N(mu, diag(exp(logvar))), a recurrent decoder maps z back to a string, and the training
objective is the evidence lower bound (ELBO, Kingma & Welling 2014). Unlike the paper (SMILES, CNN
encoder) the strings are SELFIES (Krenn et al. 2020, "Self-referencing embedded strings"), so every
decoded token sequence is a molecule, and the encoder is a bidirectional GRU.

The decoder is conditioned on z twice: z sets the GRU's initial hidden state and is concatenated to
every input embedding, so the decoder cannot forget it over a long string. Against posterior collapse
(a decoder that ignores z) training anneals the KL weight beta from 0 (Bowman et al. 2016, "Generating
sentences from a continuous space") and grants each latent dimension a few free nats (Kingma et al.
2016, "Improved variational inference with inverse autoregressive flow").

Token sequences are ``<s> t_1 ... t_n </s> <pad> ...``; ``max_len`` bounds n, the SELFIES tokens of
one molecule. Interpolation encodes two molecules to their posterior means and greedily decodes
points on the great circle (slerp) or the straight line (lerp) between them.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import selfies
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from genserve.models.molecule import chem
from genserve.models.training import adamw, lr_at, set_lr, snapshot

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Named drugs for the model card's example interpolation (all inside the MOSES element set).
EXAMPLE_PAIR = (("aspirin", "CC(=O)Oc1ccccc1C(=O)O"), ("ibuprofen", "CC(C)Cc1ccc(C(C)C(=O)O)cc1"))


@dataclass
class MolVAEConfig:
    vocab: list[str]  # SELFIES tokens, SPECIALS first
    embed_dim: int = 64
    hidden_size: int = 256
    latent_dim: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 2
    max_len: int = 72  # SELFIES tokens per molecule, <s> and </s> not counted

    def __post_init__(self) -> None:
        if tuple(self.vocab[:3]) != SPECIALS:
            raise ValueError(f"vocab must start with {list(SPECIALS)}, got {self.vocab[:3]}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab has duplicate tokens")
        for name in ("embed_dim", "hidden_size", "latent_dim", "encoder_layers", "decoder_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @cached_property
    def token_ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.vocab)}

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "genserve-mol-vae", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MolVAEConfig:
        """Reads ``to_dict`` output; keys that are not config fields (``model_type``) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --- the network --------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Bidirectional GRU over the whole token sequence; its last layer's final states give mu, logvar."""

    def __init__(self, c: MolVAEConfig) -> None:
        super().__init__()
        self.gru = nn.GRU(c.embed_dim, c.hidden_size, c.encoder_layers, batch_first=True, bidirectional=True)
        self.to_latent = nn.Linear(2 * c.hidden_size, 2 * c.latent_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)  # (layers * 2, B, H)
        h = torch.cat([h[-2], h[-1]], dim=-1)  # (B, 2H): last layer, forward and backward directions
        mu, logvar = self.to_latent(h).chunk(2, dim=-1)  # (B, Z) each
        return mu, logvar


class Decoder(nn.Module):
    """GRU language model over SELFIES tokens, conditioned on z via its initial state and every input."""

    def __init__(self, c: MolVAEConfig) -> None:
        super().__init__()
        self.layers, self.hidden = c.decoder_layers, c.hidden_size
        self.z_to_h = nn.Linear(c.latent_dim, c.decoder_layers * c.hidden_size)
        self.gru = nn.GRU(c.embed_dim + c.latent_dim, c.hidden_size, c.decoder_layers, batch_first=True)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)

    def initial_state(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.z_to_h(z)).view(-1, self.layers, self.hidden)  # (B, layers, H)
        return h.transpose(0, 1).contiguous()  # (layers, B, H)

    def forward(self, x: torch.Tensor, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([x, z[:, None].expand(-1, x.shape[1], -1)], dim=-1)  # (B, T, E + Z)
        y, h = self.gru(x, h)  # (B, T, H), (layers, B, H)
        return self.head(y), h  # (B, T, V)


class MolVAE(nn.Module):
    def __init__(self, config: MolVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD_ID)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def posterior(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu, logvar of q(z | x) for (B, T) padded ``<s> ... </s>`` tokens."""
        lengths = (tokens != PAD_ID).sum(1)
        return self.encoder(self.embed(tokens), lengths)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The posterior means (B, Z): the deterministic embedding used for interpolation."""
        return self.posterior(tokens)[0]

    def forward(self, tokens: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits (B, T-1, V) predicting ``tokens[:, 1:]`` from one posterior sample, and mu, logvar."""
        mu, logvar = self.posterior(tokens)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * torch.exp(0.5 * logvar)  # reparameterisation trick
        logits, _ = self.decoder(self.embed(tokens[:, :-1]), z, self.decoder.initial_state(z))
        return logits, mu, logvar

    def loss(self, tokens: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, recon, kl), each averaged over molecules, in nats per molecule; padding is ignored.

        recon is -log p(x | z) summed over a molecule's tokens (``</s>`` included) and kl is
        KL(q(z | x) || N(0, I)), so recon + kl is the negative ELBO. total = recon + beta * kl, except
        that with ``free_bits`` > 0 each latent dimension's batch-mean KL counts as at least
        ``free_bits`` in total (no gradient pushes a dimension below it); kl is always the true value.
        """
        logits, mu, logvar = self(tokens, generator)
        B, T, V = logits.shape
        nll = F.cross_entropy(logits.float().reshape(B * T, V), tokens[:, 1:].reshape(B * T),
                              ignore_index=PAD_ID, reduction="none").view(B, T)
        recon = nll.sum(1).mean()
        kl_dims = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float())  # (B, Z)
        kl = kl_dims.sum(1).mean()
        kl_term = kl_dims.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
        return recon + beta * kl_term, recon, kl

    @torch.no_grad()
    def decode(self, z: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
               temperature: float = 0.0, max_len: int | None = None) -> list[list[int]]:
        """Token ids (without specials) for each row of z (B, Z), stopping at ``</s>`` or ``max_len`` tokens.

        temperature 0 is greedy and needs no generator. Otherwise row i draws ``max_len`` uniforms up
        front, one per step, and samples by inverting the softmax CDF, so the noise a row sees never
        depends on the rest of the batch: with one generator per row (a list), row i's tokens depend
        only on z[i] and its generator, and with one generator the batch equals decoding its rows
        one after another with it. Equality across batch sizes then holds up to floating-point
        differences in batched matrix products, which could only flip a near-tie between two tokens.
        """
        B = self._check_latents(z)
        max_len = self.config.max_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len!r}")
        noise = _decode_noise(B, max_len, generator, temperature)  # (B, max_len) or None
        h = self.decoder.initial_state(z)
        token = torch.full((B,), BOS_ID, dtype=torch.long, device=z.device)
        done = torch.zeros(B, dtype=torch.bool, device=z.device)
        out = []
        for t in range(max_len):
            logits, h = self.decoder(self.embed(token)[:, None], z, h)  # (B, 1, V)
            logits = logits[:, 0].float()
            logits[:, [PAD_ID, BOS_ID]] = float("-inf")
            token = _pick(logits, None if noise is None else noise[:, t].to(z.device), temperature)
            token = token.masked_fill(done, PAD_ID)
            out.append(token)
            done |= token == EOS_ID
            if done.all():
                break
        rows = torch.stack(out, dim=1).tolist()  # (B, steps)
        return [row[:row.index(EOS_ID)] if EOS_ID in row else row for row in rows]

    def _check_latents(self, z: torch.Tensor) -> int:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        return z.shape[0]


def _decode_noise(batch: int, max_len: int, generator: torch.Generator | list[torch.Generator] | None,
                  temperature: float) -> torch.Tensor | None:
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature == 0:
        return None
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} latent vectors")
        return torch.stack([torch.rand(max_len, generator=g, device=g.device) for g in generator])  # (B, max_len)
    device = "cpu" if generator is None else generator.device
    return torch.rand(batch, max_len, generator=generator, device=device)  # row-major: row i is the i-th block


def _pick(logits: torch.Tensor, u: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Greedy (u is None) or inverse-CDF sampling of one token per row; ``right=True`` never picks a
    zero-probability token, even for u == 0."""
    if u is None:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)  # (B, V)
    return torch.searchsorted(cdf, u[:, None].contiguous(), right=True)[:, 0].clamp(max=logits.shape[-1] - 1)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) for vectors a, b (Z,) and t scalar or (S,) → (S, Z).

    Falls back to linear interpolation when a and b are (anti)parallel, where the great circle is
    undefined or degenerate.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).reshape(-1, 1)  # (S, 1)
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if torch.sin(omega).abs() < 1e-6:
        return lerp(a, b, t)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device).reshape(-1, 1)  # (S, 1)
    return (1 - t) * a + t * b


# --- tokens, SELFIES and SMILES -----------------------------------------------------------------


def _config(vae_or_config: MolVAE | MolVAEConfig) -> MolVAEConfig:
    return vae_or_config.config if isinstance(vae_or_config, MolVAE) else vae_or_config


def selfies_ids(config: MolVAEConfig, s: str) -> list[int]:
    """``<s> tokens </s>`` ids; ValueError names tokens outside the vocabulary or a string over ``max_len``."""
    tokens = list(selfies.split_selfies(s))
    unknown = sorted({t for t in tokens if t not in config.token_ids or t in SPECIALS})
    if unknown:
        raise ValueError(f"SELFIES tokens not in the model's vocabulary: {', '.join(unknown)}")
    if len(tokens) > config.max_len:
        raise ValueError(f"{len(tokens)} SELFIES tokens exceed the model's max_len of {config.max_len}")
    return [BOS_ID, *(config.token_ids[t] for t in tokens), EOS_ID]


def encode_selfies_batch(vae_or_config: MolVAE | MolVAEConfig, selfies_list: list[str]) -> torch.Tensor:
    """Padded (B, T) LongTensor of ``<s> tokens </s>`` rows, T the longest row; raises like ``selfies_ids``."""
    config = _config(vae_or_config)
    rows = [selfies_ids(config, s) for s in selfies_list]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows], dtype=torch.long)


def ids_to_selfies(vae_or_config: MolVAE | MolVAEConfig, ids: list[int]) -> str:
    """SELFIES string of decoded ids, stopping at ``</s>`` and skipping the other specials."""
    vocab = _config(vae_or_config).vocab
    tokens = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
    return "".join(vocab[i] for i in tokens if i > EOS_ID)


def ids_to_smiles(vae_or_config: MolVAE | MolVAEConfig, ids: list[int]) -> str | None:
    """Canonical SMILES of decoded ids, or None when they decode to no molecule (e.g. an empty string)."""
    return chem.selfies_to_smiles(ids_to_selfies(vae_or_config, ids))


class MoleculeInputError(ValueError):
    """A SMILES argument the model cannot encode; ``param`` names it for the API's error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def input_selfies(config: MolVAEConfig, smiles: str, param: str) -> str:
    """SELFIES of the canonical form of ``smiles``; MoleculeInputError naming ``param`` when it is not a
    parsable molecule or not expressible in SELFIES or in the model's vocabulary and length."""
    if chem.canonical_smiles(smiles) is None:
        raise MoleculeInputError(param, f"{param} is not a parsable molecule: {smiles!r}")
    s = chem.smiles_to_selfies(smiles)
    if s is None:
        raise MoleculeInputError(param, f"{param} {smiles!r} cannot be expressed in SELFIES")
    try:
        selfies_ids(config, s)
    except ValueError as e:
        raise MoleculeInputError(param, f"{param} {smiles!r} is not expressible by this model: {e}") from None
    return s


@torch.no_grad()
def interpolate(model: MolVAE, start_smiles: str, end_smiles: str, steps: int,
                method: Literal["slerp", "lerp"] = "slerp") -> list[str]:
    """Greedy SELFIES decodes at ``steps`` evenly spaced points from start's posterior mean to end's,
    both ends included. Deterministic. The ends are decodes, so they equal the inputs only when the
    model reconstructs them; a point that decodes to nothing gives an empty string."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (both ends are included), got {steps!r}")
    if method not in ("slerp", "lerp"):
        raise ValueError(f"method must be 'slerp' or 'lerp', got {method!r}")
    ends = [input_selfies(model.config, start_smiles, "start"),
            input_selfies(model.config, end_smiles, "end")]
    device = next(model.parameters()).device
    mu = model.encode(encode_selfies_batch(model, ends).to(device)).float()  # (2, Z)
    t = torch.linspace(0, 1, steps, device=device)
    z = (slerp if method == "slerp" else lerp)(mu[0], mu[1], t)  # (steps, Z)
    dtype = next(model.parameters()).dtype
    return [ids_to_selfies(model, ids) for ids in model.decode(z.to(dtype))]


# --- weights ------------------------------------------------------------------------------------


def save(model: MolVAE, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (weights in ``dtype``) to the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def load(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MolVAE:
    """The model saved in directory ``path``, in eval mode; ValueError when the weights do not match config.json."""
    path = Path(path)
    model = MolVAE(MolVAEConfig.from_dict(json.loads((path / "config.json").read_text())))
    state = load_file(str(path / "model.safetensors"))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match config.json: {e}") from None
    return model.to(device=device, dtype=dtype).eval()


# --- evaluation ---------------------------------------------------------------------------------


def _encodable(config: MolVAEConfig, smiles: list[str]) -> tuple[list[str], list[str]]:
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


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def heldout_elbo(model: MolVAE, selfies_list: list[str], seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """(recon, kl) in nats per molecule, one seeded posterior sample each; their sum is the negative ELBO."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    recon = kl = 0.0
    for chunk in _chunks(selfies_list, batch_size):
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
    smiles, selfies_list = (x[:n] for x in _encodable(model.config, test_smiles))
    if not smiles:
        raise ValueError("none of test_smiles can be encoded by the model")
    recon, kl = heldout_elbo(model, selfies_list, seed, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    for smi_chunk, sf_chunk in zip(_chunks(smiles, batch_size), _chunks(selfies_list, batch_size), strict=True):
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


# --- training -----------------------------------------------------------------------------------


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
    held_smiles, held_selfies = _encodable(model.config, rng.sample(test, min(cfg.heldout_molecules, len(test))))
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
    except MoleculeInputError as e:
        log.warning("no example interpolation: %s", e)
        return None
    return {"start": start_name, "end": end_name, "start_smiles": start, "end_smiles": end, "method": "slerp",
            "smiles": [chem.selfies_to_smiles(s) or "" for s in path]}


def _machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {threads} threads, torch {torch.__version__}"


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
              "loss_curve": fit["curve"], "machine": _machine(cfg.threads), "config": asdict(cfg)}
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(model_card(report))
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
