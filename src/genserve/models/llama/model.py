"""Llama-family decoder, readable top to bottom.

LLaMA (Touvron et al., 2023, arXiv:2302.13971): pre-norm decoder with RMSNorm (Zhang & Sennrich,
2019), rotary position embeddings (Su et al., 2021, RoFormer), SwiGLU feed-forward (Shazeer, 2020)
and grouped-query attention (Ainslie et al., 2023, GQA).

Parameter names follow Hugging Face's ``LlamaForCausalLM`` exactly, so a ``model.safetensors``
written by either loads into the other unchanged, and ``config.json`` is the Hugging Face one.
Rotary embeddings use the Hugging Face (GPT-NeoX) "rotate half" layout, not the interleaved layout
of Meta's original checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from genserve.kernels.attention import decode_attention, prefill_attention


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` dict (transformers 4.x and 5.x spellings)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known}
        rope = hf.get("rope_parameters") or {}
        if "rope_theta" in rope:  # transformers >= 5 nests RoPE settings
            kwargs["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = rope
        kwargs.setdefault("num_key_value_heads", hf.get("num_attention_heads", cls.num_attention_heads))
        return cls(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference implementation does
        # (x * rsqrt(mean(x^2) + eps)), with torch's fused op; the weight multiplies in x's dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 style ``rope_scaling`` applied when the config has it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values for a batch of sequences that advance together (one prompt, ``n`` samples).

    Allocated once at its full length; ``length`` says how much of it is filled.
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0


@dataclass
class PagedBatch:
    """One engine step's tokens, flattened: every decoding sequence's next token first, then the
    whole prompt of every sequence being prefilled (vLLM's layout).

    The KV cache of layer ``i`` is a pair of (num_blocks, block_size, n_kv, head_dim) tensors;
    token ``j`` writes its key and value at flat slot ``slot_mapping[j]`` of it.
    """

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slot_mapping: torch.Tensor  # (T,) int64
    num_decode: int
    block_tables: torch.Tensor  # (num_decode, max_blocks) int32: the decoding sequences' blocks
    context_lens: torch.Tensor  # (num_decode,) int32: cached tokens after this step's write
    cu_seqlens: torch.Tensor  # (num_prefill + 1,) int32: prompt boundaries after the decode tokens
    max_seqlen: int
    logits_index: torch.Tensor  # (S,): the token whose logits each sequence samples from
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, n_kv, start+T, hd)
            # Query i sits at absolute position start+i and sees keys 0..start+i.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head*hd)
        return self.o_proj(y)

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv: tuple[torch.Tensor, torch.Tensor], batch: PagedBatch) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_head, self.head_dim)  # (T, n_head, hd)
        k = self.k_proj(x).view(T, self.n_kv, self.head_dim)  # (T, n_kv, hd)
        v = self.v_proj(x).view(T, self.n_kv, self.head_dim)  # (T, n_kv, hd)
        cos, sin = cos[:, None], sin[:, None]  # (T, 1, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = kv
        k_cache.view(-1, self.n_kv, self.head_dim).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, self.n_kv, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        nd = batch.num_decode
        if nd == T:
            y = decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens)
        elif nd == 0:  # prompts start empty (no prefix cache), so their own keys are all they see
            y = prefill_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen)
        else:
            y = torch.cat([decode_attention(q[:nd], k_cache, v_cache, batch.block_tables, batch.context_lens),
                           prefill_attention(q[nd:], k[nd:], v[nd:], batch.cu_seqlens, batch.max_seqlen)])
        return self.o_proj(y.reshape(T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, start: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv: tuple[torch.Tensor, torch.Tensor], batch: PagedBatch) -> torch.Tensor:
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), cos, sin, kv, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for matrices, scaled down on residual outputs (GPT-2's recipe)."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, std=std * scale)

    def rope(self, start: int, T: int, device: torch.device, dtype: torch.dtype):
        return self.rope_at(torch.arange(start, start + T, device=device), dtype)

    def rope_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, hd) for the absolute ``positions`` (T,)."""
        freqs = torch.outer(positions.float(), self.inv_freq.to(positions.device))  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for ``input_ids`` (B, T), continuing ``cache`` when given."""
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope(start, T, x.device, x.dtype)
        for i, layer in enumerate(self.model.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x = layer(x, cos, sin, kv, start)
        if cache is not None:
            cache.length = start + T
        return self.lm_head(self.model.norm(x))

    def forward_paged(self, batch: PagedBatch) -> torch.Tensor:
        """Logits (S, vocab) at ``batch.logits_index`` for one engine step over the paged cache."""
        x = self.model.embed_tokens(batch.input_ids)  # (T, C)
        cos, sin = self.rope_at(batch.positions, x.dtype)
        for layer, kv in zip(self.model.layers, batch.kv_caches, strict=True):
            x = layer.forward_paged(x, cos, sin, kv, batch)
        x = x.index_select(0, batch.logits_index)  # (S, C): only the rows that are sampled
        return self.lm_head(self.model.norm(x))

    def new_paged_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The engine's KV memory, allocated once: per layer, keys and values of
        (num_blocks, block_size, n_kv, head_dim)."""
        c, p = self.config, self.model.embed_tokens.weight
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        return [(torch.zeros(shape, device=p.device, dtype=p.dtype), torch.zeros(shape, device=p.device, dtype=p.dtype))
                for _ in range(c.num_hidden_layers)]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight  # lm_head may be quantized; the embedding never is
        return KVCache(self.config, batch, max_len, p.device, p.dtype)


def load_llama(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Builds the model from a Hugging Face directory (``config.json`` + ``model*.safetensors``)."""
    path = Path(path)
    config = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    # Hugging Face's names (model.safetensors, model-00001-of-00002.safetensors); other safetensors
    # files in the directory (a molecule model's training-set hashes) are not weights.
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no model*.safetensors file in {path}")
    for shard in shards:
        state.update(load_file(shard, device=str(device)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match config.json: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()
