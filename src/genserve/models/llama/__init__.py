"""Llama-family decoders: the network (``model``), its training (``train``, ``corpus``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genserve.kernels.int4 import quantize_linears_int4
from genserve.kernels.int8 import quantize_linears_int8
from genserve.models.common.loading import weights_dir
from genserve.models.llama.model import LlamaConfig, load_llama
from genserve.models.text.generate import TextModel


def load_info(path: Path, device: torch.device) -> TextModel:
    """The tokenizer, end-of-sequence ids and context of a Hugging Face Llama directory, without
    its weights (``model`` is None): what a gateway needs to check and tokenize requests."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = set()
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            ids = json.loads((path / name).read_text()).get("eos_token_id")
            eos.update(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    config = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    return TextModel(model=None, tokenizer=tokenizer, eos_ids=eos, context=config.max_position_embeddings,
                     device=torch.device(device), vocab_size=config.vocab_size)


def load(path: Path, device: torch.device, dtype: torch.dtype, quantization: str = "none") -> TextModel:
    """Loads a Hugging Face Llama directory with our own network and its tokenizer.

    ``quantization="int8"``: every linear layer but a tied ``lm_head`` keeps int8 weights with one
    scale per output channel. ``"int4"``: 4-bit weights with a scale and zero-point per group of 64
    inputs, or of 32 or 16 where the layer's width is not a multiple of 64.
    """
    tm = load_info(path, device)
    tm.model = load_llama(path, device=device, dtype=dtype)
    tied = tm.model.config.tie_word_embeddings  # quantizing it would keep a second copy of the embedding
    skip = lambda name, _: tied and name == "lm_head"  # noqa: E731
    if quantization == "int8":
        quantize_linears_int8(tm.model, skip=skip)
    elif quantization == "int4":
        for group_size in (64, 32, 16):  # each pass takes the float layers the previous one could not
            quantize_linears_int4(tm.model, skip=skip, group_size=group_size)
    elif quantization != "none":
        raise ValueError(f"unsupported quantization {quantization!r}; supported: none, int8, int4")
    return tm


def make_tiny(path: Path, tokenizer_from: Path | None = None) -> None:
    """A tiny seeded Llama (one layer, width 32) with the tokenizer of ``tokenizer_from`` (default: the
    shipped genserve-text-tiny's), saved in ``path`` as a Hugging Face directory (the contract test's instance)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or weights_dir() / "genserve-text-tiny")
    torch.manual_seed(0)
    config = HFLlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
