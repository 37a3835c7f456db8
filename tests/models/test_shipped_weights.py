"""The shipped weights directory keeps its promises: standard formats, portable configs, budget."""

from __future__ import annotations

import json

from tests.conftest import ROOT, TEXT_DIR

WEIGHTS = ROOT / "src" / "genserve" / "models" / "weights"


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


MOL_DIR = WEIGHTS / "genserve-mol"
MOL_VAE_DIR = WEIGHTS / "genserve-mol-vae"


def test_mol_generator_loads_in_transformers_with_our_logits() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genserve.models.llama.model import load_llama

    tok = AutoTokenizer.from_pretrained(MOL_DIR)
    ids = tok("[C][C][=Branch1][C][=O][O][C][=C][C][=C][C][=C][Ring1][=Branch1]", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id and tok.unk_token_id not in ids[0].tolist()
    theirs = AutoModelForCausalLM.from_pretrained(MOL_DIR, dtype=torch.float32).eval()
    ours = load_llama(MOL_DIR)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_mol_cards_carry_their_measured_numbers() -> None:
    from genserve.models.molecule.generator import TrainingSet

    ev = json.loads((MOL_DIR / "eval" / "moses_eval.json").read_text())
    card = (MOL_DIR / "README.md").read_text()
    assert f"{ev['metrics']['FCD/Test']:.3f}" in card and f"{ev['metrics']['Novelty']:.3f}" in card
    assert (MOL_DIR / "eval" / "property_distributions.png").is_file()
    assert len(TrainingSet.load(MOL_DIR)) > 1_500_000  # all of MOSES train
    report = json.loads((MOL_VAE_DIR / "training_report.json").read_text())
    assert f"{report['reconstruction_accuracy']:.3f}" in (MOL_VAE_DIR / "README.md").read_text()
