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
points on the great circle (slerp) or the straight line (lerp) between them. Training is in
``vae_train.py`` (``genserve train mol-vae``), the measures in ``vae_evaluate.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import selfies
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from genserve.models.common.interpolation import lerp, slerp
from genserve.models.errors import InputError
from genserve.models.molecule import chem

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


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

def input_selfies(config: MolVAEConfig, smiles: str, param: str) -> str:
    """SELFIES of the canonical form of ``smiles``; InputError naming ``param`` when it is not a
    parsable molecule or not expressible in SELFIES or in the model's vocabulary and length."""
    if chem.canonical_smiles(smiles) is None:
        raise InputError(f"{param} is not a parsable molecule: {smiles!r}", param)
    s = chem.smiles_to_selfies(smiles)
    if s is None:
        raise InputError(f"{param} {smiles!r} cannot be expressed in SELFIES", param)
    try:
        selfies_ids(config, s)
    except ValueError as e:
        raise InputError(f"{param} {smiles!r} is not expressible by this model: {e}", param) from None
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
    z = slerp(mu[0], mu[1], t, norms=False) if method == "slerp" else lerp(mu[0], mu[1], t)  # (steps, Z)
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


def make_tiny(path: Path) -> None:
    """A tiny seeded VAE over a few SELFIES tokens, saved in ``path`` (the family contract test's instance)."""
    torch.manual_seed(0)
    vocab = [*SPECIALS, "[C]", "[O]", "[N]", "[=C]", "[=O]", "[Ring1]", "[Branch1]", "[#C]", "[F]", "[Cl]"]
    save(MolVAE(MolVAEConfig(vocab=vocab, embed_dim=8, hidden_size=16, latent_dim=4, max_len=16)), path)
