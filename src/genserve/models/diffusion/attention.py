"""genserve's dense attention kernel inside diffusers denoisers (``attention: genserve`` in the registry).

:class:`GenserveAttnProcessor` is diffusers' ``AttnProcessor2_0`` (the default processor of every
``Attention`` module with ``scale_qk``, which UNets and DiT-style transformers use for
self-attention over image positions and cross-attention to text tokens) with its
``F.scaled_dot_product_attention`` call replaced by ``kernels.attention.dense_attention``: the
Triton kernel for CUDA tensors, SDPA itself for CPU tensors and head sizes the kernel does not take.
Everything around the attention is ``AttnProcessor2_0``'s: spatial norm, group norm, the cross
norm, q/k norms, projections, residual connection and output rescaling. Two differences:

- a call with an attention mask runs SDPA with that mask, as ``AttnProcessor2_0`` does, since the
  kernel takes none (Stable Diffusion pipelines pass none; some text encoders' padding masks do);
- the softmax scale is the module's ``attn.scale``. ``AttnProcessor2_0`` leaves it to SDPA's
  default 1/sqrt(head size), the same value whenever ``scale_qk`` holds, which is when diffusers
  picks it; with ``scale_qk=False`` (scale 1) diffusers' default is ``AttnProcessor``, left alone.

The deprecated positional ``scale`` argument ``AttnProcessor2_0`` warns about is ignored.

:func:`use_genserve_attention` installs it on a pipeline's ``unet`` and ``transformer`` wherever
the processor is exactly ``AttnProcessor2_0``. Other processors (FLUX's and SD3's joint attention,
IP-adapter, fused-QKV, added-KV, xformers, ...) compute something else around the attention, so
they are kept, and a log line names them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from genserve.kernels.attention import dense_attention

log = logging.getLogger(__name__)

DENOISERS = ("unet", "transformer")


class GenserveAttnProcessor:
    """``AttnProcessor2_0`` computing unmasked attention with ``kernels.attention.dense_attention``."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # SDPA wants the mask as (batch, heads, query length, key length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (B, L, heads * head_dim) -> (B, heads, L, head_dim): strided views the kernel reads in place
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = dense_attention(query, key, value, scale=attn.scale)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_genserve_attention(pipe: Any) -> int:
    """Sets :class:`GenserveAttnProcessor` on every attention module of ``pipe``'s ``unet`` and
    ``transformer`` (or of ``pipe`` itself when it is a module) whose processor is exactly
    ``AttnProcessor2_0``; returns how many it replaced. Call it before ``torch.compile``."""
    denoisers = [pipe] if isinstance(pipe, nn.Module) else [getattr(pipe, name, None) for name in DENOISERS]
    processor = GenserveAttnProcessor()  # stateless: one serves every module
    replaced, kept = 0, Counter()
    for denoiser in denoisers:
        if denoiser is None:
            continue
        for module in denoiser.modules():
            current = getattr(module, "processor", None)
            if current is None or not hasattr(module, "set_processor"):
                continue
            if type(current) is AttnProcessor2_0:
                module.set_processor(processor)
                replaced += 1
            else:
                kept[type(current).__name__] += 1
    others = ", ".join(f"{n} x {name}" for name, n in sorted(kept.items()))
    log.info("genserve attention in %d attention modules%s", replaced,
             f"; kept their own processors (not AttnProcessor2_0): {others}" if kept else "")
    return replaced
