"""``genserve train mol``: trains ``genserve-mol``, a Llama-architecture decoder over SELFIES tokens.

SELFIES (Krenn et al. 2020, "Self-referencing embedded strings") is a molecular string grammar in
which every token sequence decodes to a valid molecule, so validity is 1 by construction and the
model spends its capacity on chemistry, not on syntax. Each MOSES training molecule becomes
``<s> [C][C][=O] ... </s>``; the model is the same Llama network as ``genserve-text-tiny``, saved as
a Hugging Face directory (word-level ``tokenizer.json`` whose decoder joins tokens), so the text
engine, ``transformers`` and vLLM all load it.

Training runs for a wall-clock budget (warm-up then cosine decay over it); batches are molecules of
similar length padded to the longest, the loss ignores padding, and the checkpoint with the lowest
held-out loss (MOSES ``test`` molecules) is saved.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import torch
import torch.nn.functional as F

from genserve.models.common.reports import machine
from genserve.models.common.training import adamw, lr_at, set_lr, snapshot
from genserve.models.llama.model import LlamaConfig, LlamaForCausalLM, load_llama
from genserve.models.llama.train import save_hf

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SELFIES_TOKEN = r"\[[^\]]*\]"


@dataclass
class MolTrainConfig:
    minutes: float = 50.0
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    context: int = 128
    batch_size: int = 96
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    eval_every: int = 250
    heldout_molecules: int = 4000
    train_molecules: int | None = None  # a random subset of MOSES train (None: all 1.58M)
    seed: int = 0
    threads: int = 2


def encode_selfies(smiles: list[str], processes: int = 2) -> list[str]:
    """SELFIES strings for ``smiles`` (those the encoder rejects are dropped), in parallel."""
    with Pool(processes) as pool:
        out = pool.map(_encode_one, smiles, chunksize=2000)
    return [s for s in out if s]


def _encode_one(smiles: str) -> str | None:
    import selfies as sf

    try:
        return sf.encoder(smiles)
    except sf.EncoderError:
        return None


def build_tokenizer(selfies_strings: list[str]):
    """Word-level tokenizer over the SELFIES alphabet of the data; decoding concatenates tokens."""
    import selfies as sf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted({t for s in selfies_strings for t in sf.split_selfies(s)})
    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK, *alphabet])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SELFIES_TOKEN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=None, clean_up_tokenization_spaces=False)


def tokenize(tok, selfies_strings: list[str], context: int) -> list[list[int]]:
    """``<s> tokens </s>`` id lists, dropping molecules longer than the context."""
    eos = tok.convert_tokens_to_ids(EOS)
    out = [[*ids, eos] for ids in tok(selfies_strings)["input_ids"]]
    return [ids for ids in out if len(ids) <= context]


def batches(seqs: list[list[int]], batch_size: int, pad: int, rng: random.Random):
    """Endless padded (B, T) batches; each draws ``batch_size`` molecules of similar length from a
    random pool of 32 batches' worth, so padding stays small."""
    while True:
        pool = sorted(rng.sample(seqs, min(len(seqs), 32 * batch_size)), key=len)
        chunks = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(s) for s in chunk)
            yield torch.tensor([s + [pad] * (width - len(s)) for s in chunk])


def sequence_loss(model: LlamaForCausalLM, batch: torch.Tensor, pad: int, reduction: str = "mean") -> torch.Tensor:
    logits = model(batch[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), ignore_index=pad,
                           reduction=reduction)


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, seqs: list[list[int]], pad: int) -> tuple[float, float]:
    """Mean NLL per predicted token and per molecule over ``seqs``."""
    model.eval()
    total = tokens = 0.0
    ordered = sorted(seqs, key=len)
    for i in range(0, len(ordered), 256):
        chunk = ordered[i:i + 256]
        width = max(len(s) for s in chunk)
        batch = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        total += sequence_loss(model, batch, pad, reduction="sum").item()
        tokens += sum(len(s) - 1 for s in chunk)
    model.train()
    return total / tokens, total / len(seqs)


def train_mol(out: Path, cfg: MolTrainConfig) -> dict:
    from genserve.models.molecule.data import moses_smiles
    from genserve.models.molecule.generator import save_training_set

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    train_smiles = moses_smiles("train")
    if cfg.train_molecules is not None and cfg.train_molecules < len(train_smiles):
        train_smiles = rng.sample(train_smiles, cfg.train_molecules)
    train_selfies = encode_selfies(train_smiles, processes=2)
    held_smiles = rng.sample(moses_smiles("test"), cfg.heldout_molecules)
    tok = build_tokenizer(train_selfies)
    train_ids = tokenize(tok, train_selfies, cfg.context)
    held_ids = tokenize(tok, encode_selfies(held_smiles, processes=1), cfg.context)
    pad = tok.pad_token_id
    log.info("data: %d training molecules (%d tokens), %d held-out, vocabulary %d, encoded in %.0fs",
             len(train_ids), sum(map(len, train_ids)), len(held_ids), len(tok), time.time() - t0)

    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.context)
    model = LlamaForCausalLM(mcfg)
    model.init_weights()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    opt = adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    best: tuple[float, dict | None, int] = (float("inf"), None, 0)
    step, seen, start, budget = 0, 0, time.time(), cfg.minutes * 60
    for batch in batches(train_ids, cfg.batch_size, pad, rng):
        if (elapsed := time.time() - start) >= budget:
            break
        set_lr(opt, lr_at(cfg, step, elapsed / budget))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sequence_loss(model, batch, pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += batch.shape[0]
        if step % cfg.eval_every == 0:
            nll, _ = heldout_nll(model, held_ids, pad)
            if nll < best[0]:
                best = (nll, snapshot(model), step)
            log.info("step %d  %.0fs  %d molecules  train loss %.4f  held-out nll %.4f  lr %.2e",
                     step, elapsed, seen, loss.item(), nll, opt.param_groups[0]["lr"])
    if best[1] is not None:
        model.load_state_dict(best[1])
    save_hf(model, tok, out, bos=BOS, eos=(EOS,), chat_template=None)
    # Novelty at serving time: hashes of all of MOSES train (its SMILES are RDKit-canonical already).
    save_training_set(moses_smiles("train"), out)
    shipped = load_llama(out)  # what ships: bf16 weights, read back through our loader, fp32 compute
    nll, per_mol = heldout_nll(shipped, held_ids, pad)
    report = {"steps": step, "best_step": best[2], "minutes": (time.time() - t0) / 60, "parameters": n_params,
              "train_molecules": len(train_ids), "molecules_seen": seen, "heldout_molecules": len(held_ids),
              "heldout_nll_per_token": nll, "heldout_nll_per_molecule": per_mol, "vocab_size": len(tok),
              "machine": machine(cfg.threads),
              "config": asdict(cfg)}
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved %s: held-out NLL %.4f per token (perplexity %.3f), %.2f per molecule",
             out, nll, math.exp(nll), per_mol)
    return report


def train(out: Path, minutes: float, seed: int = 0, threads: int = 2, molecules: int | None = None) -> dict:
    """``genserve train mol``: ``molecules`` trains on a random subset of that many MOSES molecules."""
    return train_mol(out, MolTrainConfig(minutes=minutes, seed=seed, threads=threads, train_molecules=molecules))
