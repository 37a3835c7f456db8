"""The shipped weights directory keeps its promises: standard formats, portable configs, budget."""

from __future__ import annotations

import json

from tests.conftest import ROOT, TEXT_DIR

WEIGHTS = ROOT / "models" / "weights"


def test_only_safetensors_and_within_budget() -> None:
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    assert sum(p.stat().st_size for p in files) < 60 * 2**20


def test_text_tiny_config_reads_in_transformers_4_5_and_vllm() -> None:
    cfg = json.loads((TEXT_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    tok = json.loads((TEXT_DIR / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tok["chat_template"]
    gen = json.loads((TEXT_DIR / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {0, 2}  # <|endoftext|> and <|im_end|>


def test_model_card_states_measured_perplexity() -> None:
    report = json.loads((TEXT_DIR / "training_report.json").read_text())
    card = (TEXT_DIR / "README.md").read_text()
    assert f"**{report['heldout_ppl']:.2f}**" in card and "PSF-2.0" in card
