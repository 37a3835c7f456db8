"""``chorale``: a small decoder-only transformer over four-voice chorale events, and its sampler.

The representation follows DeepBach (Hadjeres et al. 2017) and Coconet (Huang et al. 2017) in
spirit but is autoregressive like the Music Transformer (Huang et al. 2018): time runs on an
eighth-note grid, and each grid step is four tokens, soprano, alto, tenor, bass, each a MIDI pitch
(a note starts), ``HOLD`` (the voice's note goes on) or ``REST``. A piece is a ``BOS`` step followed
by its steps, in C major or A minor. Two embeddings are added to every token: the mode (major or
minor, the conditioning) and the *slot* of the token it predicts, i.e. which voice and which eighth
of the 4/4 bar comes next, so that the model always knows the metre. Positions are rotary (RoPE),
which lets generation run past the context with a sliding KV cache: attention depends only on
distances, so dropping the oldest cached keys needs no recomputation.

Batch invariance: the sampler decodes one token per piece per step, and its decode path computes
every row with the same kernels whatever the batch holds (linear layers as a batched matmul with
one (1, d) x (d, n) product per row, attention per row and head), so a seeded piece comes out the
same alone or inside any batch. Training uses the ordinary fused path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Vocabulary: four specials, then one token per MIDI pitch of the normalised-key range.
PAD, BOS, HOLD, REST = 0, 1, 2, 3
MIN_PITCH, MAX_PITCH = 28, 91  # E1..G6: every chorale note moved to C major / A minor fits
VOCAB_SIZE = 4 + MAX_PITCH - MIN_PITCH + 1
STEPS_PER_BEAT, BEATS_PER_BAR = 2, 4  # eighth-note grid, 4/4
STEPS_PER_BAR = STEPS_PER_BEAT * BEATS_PER_BAR
VOICES = ("soprano", "alto", "tenor", "bass")
MODES = ("major", "minor")


def pitch_token(midi: int) -> int:
    """The token of MIDI pitch ``midi``, moved by octaves into the vocabulary's range if outside it."""
    while midi < MIN_PITCH:
        midi += 12
    while midi > MAX_PITCH:
        midi -= 12
    return 4 + midi - MIN_PITCH


def token_pitch(token: int) -> int | None:
    return token - 4 + MIN_PITCH if token >= 4 else None


def slot_ids(positions: torch.Tensor) -> torch.Tensor:
    """(B, steps) positions in the bar (eighths) -> (B, 4 * steps) slot ids, voice + 4 * position, of
    every token. The model sees at input ``i`` the slot of token ``i + 1``, the one it predicts; the
    BOS step takes the position before the first step's."""
    voices = torch.arange(4, device=positions.device)
    return (voices + 4 * positions[..., None]).flatten(-2)  # (B, 4 * steps): voice + 4 * position


@dataclass
class ChoraleConfig:
    vocab_size: int = VOCAB_SIZE
    n_layer: int = 4
    n_head: int = 6
    d_model: int = 192
    context: int = 256  # tokens: 64 eighth-note steps, 8 bars
    dropout: float = 0.1
    rope_theta: float = 10_000.0
    extra: dict = field(default_factory=dict)  # free-form notes saved into config.json


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv[None]  # (T, head_dim / 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n_head, T, head_dim), rotating (even, odd) channel pairs by position."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rowwise_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for x (B, 1, d) computed as B separate (1, d) x (d, n) products, so that a row's
    result never depends on which other rows share the batch (a plain GEMM may pick its kernel, and
    with it the order of the sums, by the batch size)."""
    w = layer.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, d, n)
    y = torch.bmm(x, w)  # (B, 1, n)
    return y + layer.bias if layer.bias is not None else y


class KVCache:
    """Per layer keys and values, (B, n_head, T, head_dim), kept to the last ``context - 1`` positions."""

    def __init__(self, n_layer: int, context: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.context = context
        self.position = 0  # absolute position of the next token

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)[:, :, -self.context:]
            v = torch.cat([self.v[layer], v], dim=2)[:, :, -self.context:]
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ChoraleConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x) if cache is None else rowwise_linear(x, self.qkv)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # training and scoring: the fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        else:  # decoding one token per row: every cached key is in the past
            k, v = cache.append(layer, k, v)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, 1, T_cache)
            y = att.float().softmax(dim=-1).to(v.dtype) @ v  # (B, nh, 1, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y) if cache is None else rowwise_linear(y, self.proj)


class Block(nn.Module):
    def __init__(self, cfg: ChoraleConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.fc, self.out = nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cos, sin, cache, layer))
        h = self.ln2(x)
        if cache is None:
            return x + self.drop(self.out(F.gelu(self.fc(h))))
        return x + rowwise_linear(F.gelu(rowwise_linear(h, self.fc)), self.out)


class ChoraleTransformer(nn.Module):
    def __init__(self, cfg: ChoraleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.slot = nn.Embedding(4 * STEPS_PER_BAR, cfg.d_model)
        self.mode = nn.Embedding(len(MODES), cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, modes: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens, slots: (B, T); modes: (B,) -> logits (B, T, vocab). With ``cache``, T must be 1."""
        T = tokens.shape[1]
        start = cache.position if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        cos, sin = rope_tables(self.cfg.d_model // self.cfg.n_head, positions, self.cfg.rope_theta)
        x = self.drop(self.tok(tokens) + self.slot(slots) + self.mode(modes)[:, None])  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.position += T
            return rowwise_linear(self.ln_f(x), self.head)
        return self.head(self.ln_f(x))


class ParallelGuard:
    """Which pitches would make parallel perfect fifths or octaves (unisons and compounds included)
    with a voice above: voices are sampled top-down inside a step, so when voice ``v`` is drawn the
    voices above it have already moved. Tracks the sounding pitch of every voice, per piece."""

    def __init__(self, B: int, device: torch.device) -> None:
        self.pitch_of = torch.full((VOCAB_SIZE,), -1, device=device)
        self.pitch_of[4:] = torch.arange(MIN_PITCH, MAX_PITCH + 1, device=device)
        self.now = torch.full((B, 4), -1, device=device)     # sounding pitch at this step (-1: silent)
        self.before = torch.full((B, 4), -1, device=device)  # at the previous step
        self.moved = torch.zeros(B, 4, dtype=torch.bool, device=device)

    def update(self, voice: int, token: torch.Tensor) -> None:
        """Record the tokens just drawn for ``voice``, (B,); voice 0 opens a new step."""
        if voice == 0:
            self.before, self.moved = self.now.clone(), torch.zeros_like(self.moved)
        pitch = self.pitch_of[token]
        self.now[:, voice] = torch.where(token == HOLD, self.now[:, voice], pitch)
        self.moved[:, voice] = (pitch >= 0) & (pitch != self.before[:, voice])

    def forbidden(self, voice: int) -> torch.Tensor:
        """(B, vocab): pitches for ``voice`` at this step that move in parallel 5ths/8ves with a voice above."""
        bad = torch.zeros(self.now.shape[0], VOCAB_SIZE, dtype=torch.bool, device=self.now.device)
        prev = self.before[:, voice, None]  # (B, 1)
        for upper in range(voice):
            interval = (self.before[:, upper, None] - prev) % 12  # (B, 1)
            risky = self.moved[:, upper, None] & (prev >= 0) & (self.before[:, upper, None] >= 0)
            risky &= (interval == 0) | (interval == 7)
            same = (self.now[:, upper, None] - self.pitch_of[None]) % 12 == interval  # (B, vocab)
            bad |= risky & same & (self.pitch_of[None] >= 0) & (self.pitch_of[None] != prev)
        return bad


@torch.no_grad()
def sample(model: ChoraleTransformer, modes: torch.Tensor, steps: int, temperatures: list[float],
           generators: list[torch.Generator], allowed: torch.Tensor, avoid_parallels: bool = True,
           on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``steps`` grid steps for each of B pieces, from a downbeat: (B, steps, 4) token ids.

    modes: (B,) mode ids; one temperature and one generator per piece; allowed: (B, 4, vocab) which
    tokens each voice may take (specials and out-of-range pitches off); ``avoid_parallels``: also
    mask the pitches that :class:`ParallelGuard` forbids. One forward call per token decodes all B
    pieces; each piece draws from its own generator, one draw per token, and every mask is per
    piece, so a piece does not depend on its batch. ``on_step(step, steps)`` after each grid step
    (all four voices); what it raises stops the sampling.
    """
    B, device = modes.shape[0], modes.device
    positions = (torch.arange(-1, steps, device=device) % STEPS_PER_BAR)[None]  # (1, steps + 1): BOS step first
    slots = slot_ids(positions)[0]  # (4 * (steps + 1),) the slot of every token
    tokens = torch.full((B, 4 * (steps + 1)), BOS, dtype=torch.long, device=device)
    cache = KVCache(model.cfg.n_layer, model.cfg.context)
    guard = ParallelGuard(B, device)
    for j in range(4 * (steps + 1) - 1):
        logits = model(tokens[:, j:j + 1], slots[j + 1].expand(B, 1), modes, cache)[:, 0]  # (B, vocab)
        if j + 1 < 4:
            continue  # the input is inside the BOS step: nothing to sample yet
        voice = (j + 1) % 4
        ok = allowed[:, voice].clone()  # (B, vocab)
        previous = tokens[:, j + 1 - 4]
        ok[:, HOLD] &= (previous != REST) & (previous != BOS)  # only a sounding note can be held
        if avoid_parallels:
            ok &= ~guard.forbidden(voice)
        logits = logits.float().masked_fill(~ok, float("-inf"))
        for b in range(B):
            probs = (logits[b] / temperatures[b]).softmax(-1)
            tokens[b, j + 1] = torch.multinomial(probs, 1, generator=generators[b])[0]
        guard.update(voice, tokens[:, j + 1])
        if voice == 3 and on_step is not None:
            on_step((j + 1) // 4, steps)
    return tokens[:, 4:].view(B, steps, 4)  # (B, steps, 4)
