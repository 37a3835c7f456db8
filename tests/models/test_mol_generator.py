"""The SELFIES generator family: tokenizer, saved directory, engine sampling, training-set hashes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

sf = pytest.importorskip("selfies")
pytest.importorskip("rdkit")

from genserve.models.llama.model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from genserve.models.molecule import chem  # noqa: E402
from genserve.models.molecule.generator import TrainingSet, load, load_info, save_training_set  # noqa: E402
from genserve.models.molecule.train_generator import (  # noqa: E402
    BOS,
    EOS,
    batches,
    build_tokenizer,
    save_hf,
    sequence_loss,
    tokenize,
)
from genserve.models.text.engine import EngineConfig, LLMEngine  # noqa: E402
from genserve.models.text.sampling import SamplingParams  # noqa: E402

SMILES = ["CC(=O)Oc1ccccc1C(=O)O", "Cn1c(=O)c2c(ncn2C)n(C)c1=O", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "c1ccccc1O",
          "CCN(CC)CC", "O=C(O)c1ccccc1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    selfies = [sf.encoder(s) for s in SMILES]
    tok = build_tokenizer(selfies)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=48))
    model.init_weights()
    out = tmp_path_factory.mktemp("mol")
    save_hf(model, tok, out, bos=BOS, eos=(EOS,), chat_template=None)
    save_training_set([chem.canonical_smiles(s) for s in SMILES[:3]], out)
    return out


def test_tokenizer_round_trips_selfies_and_frames_molecules():
    selfies = [sf.encoder(s) for s in SMILES]
    tok = build_tokenizer(selfies)
    ids = tokenize(tok, selfies, context=64)
    for s, row in zip(selfies, ids, strict=True):
        assert row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id
        assert len(row) == len(list(sf.split_selfies(s))) + 2
        assert tok.decode(row, skip_special_tokens=True) == s
    assert tokenize(tok, selfies, context=5) == [r for r in ids if len(r) <= 5]


def test_batches_pad_and_the_loss_ignores_padding():
    selfies = [sf.encoder(s) for s in SMILES]
    tok = build_tokenizer(selfies)
    ids = tokenize(tok, selfies, 64)
    batch = next(batches(ids, 3, tok.pad_token_id, random.Random(0)))
    assert batch.shape[0] == 3 and (batch == tok.pad_token_id).any()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    longer = torch.cat([batch, torch.full((3, 5), tok.pad_token_id)], dim=1)  # more padding, same loss
    torch.testing.assert_close(sequence_loss(model, batch, tok.pad_token_id),
                               sequence_loss(model, longer, tok.pad_token_id))


def test_saved_directory_loads_and_samples_molecules_on_the_engine(model_dir: Path):
    info = load_info(model_dir, torch.device("cpu"))
    assert info.tokenizer.bos_token_id is not None and info.eos_ids == {info.tokenizer.eos_token_id}
    tm = load(model_dir, torch.device("cpu"), torch.float32)
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context, 2048, max_num_seqs=16))
    texts = [""] * 24

    def collect(ev):
        for o in ev.outputs:
            texts[o.index] += o.text

    params = SamplingParams(n=24, temperature=1.0, seed=4, max_tokens=tm.context - 1)
    engine.add_request("r", [tm.tokenizer.bos_token_id], params, collect)
    while engine.has_work():
        engine.step()
    decoded = [chem.selfies_to_smiles(t) for t in texts]
    assert sum(d is not None for d in decoded) >= 20  # random weights, but SELFIES: nearly all molecules
    assert all("<" not in t for t in texts)  # special tokens never reach the text


def test_training_set_membership(model_dir: Path):
    ts = TrainingSet.load(model_dir)
    assert ts is not None and len(ts) == 3
    assert chem.canonical_smiles(SMILES[0]) in ts and chem.canonical_smiles(SMILES[4]) not in ts
    assert TrainingSet.load(model_dir / "missing") is None
