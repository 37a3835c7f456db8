"""Our Llama network against transformers' reference, on random small models saved as HF directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM as HFLlama

from genserve.models.llama.model import LlamaConfig, load_llama

CONFIGS = {
    "gqa-tied": {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "mha-untied-theta": {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False,
                         "rope_theta": 500000.0},
    "llama3-rope-scaling": {"num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": False,
                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}


def hf_dir(tmp_path: Path, extra: dict) -> Path:
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   max_position_embeddings=128, rms_norm_eps=1e-5, **extra)
    model = HFLlama(cfg).eval()
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_prefill_and_cached_decode(tmp_path: Path, name: str) -> None:
    path = hf_dir(tmp_path, CONFIGS[name])
    hf = HFLlama.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_llama(path)
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max() <= 1e-4
        # Prefill 8 tokens, then decode the rest one at a time through the cache.
        cache = ours.new_cache(3, 40)
        steps = [ours(ids[:, :8], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(8, 40)]
        assert (torch.cat(steps, dim=1) - ref).abs().max() <= 1e-4


def test_config_reads_both_transformers_spellings() -> None:
    v4 = LlamaConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 5e5})
    v5 = LlamaConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert v4.rope_theta == v5.rope_theta == 5e5
    assert v4.num_key_value_heads == 4 and v4.head_dim == 16  # MHA when kv heads are not given


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    path = hf_dir(tmp_path, CONFIGS["gqa-tied"])
    cfg = (path / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="missing"):
        load_llama(path)


def test_context_overflow_is_an_error(tmp_path: Path) -> None:
    model = load_llama(hf_dir(tmp_path, CONFIGS["gqa-tied"]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 129, dtype=torch.long))
