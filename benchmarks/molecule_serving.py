"""Valid unique molecules per second: genserve's endpoint at n = 1000 against transformers ``generate``.

Three ways to get distinct valid molecules from the same model directory (``genserve-mol``), on the
same CPU, in one run:

- ``genserve``: ``POST /v1/molecules/generations`` with ``n`` molecules (default 1000), unique,
  no constraints, timed at the client (HTTP, the engine, SELFIES decoding, canonicalisation,
  properties); repeated ``--repeats`` times with different seeds;
- ``generate, one at a time``: ``model.generate`` of transformers, one molecule per call, the way a
  notebook loop does it;
- ``generate, batched``: ``model.generate`` with ``num_return_sequences=--batch`` per call (padded
  static batches), decoded and de-duplicated the same way.

Every side counts only valid molecules with a canonical SMILES not seen before in its run::

    .venv/bin/python benchmarks/molecule_serving.py
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import builtin_entry, cpu_name, registry_server  # noqa: E402
from genserve.models.common.loading import resolve_dtype  # noqa: E402
from genserve.models.molecule import chem  # noqa: E402


def bench_genserve(model_dir: Path, n: int, repeats: int, threads: int, workdir: Path) -> list[dict]:
    entry = builtin_entry("genserve-mol") | {"source": str(model_dir)}
    rows = []
    with registry_server([entry], workdir, threads, 300) as url, httpx.Client(base_url=url, timeout=600) as client:
        client.post("/v1/molecules/generations", json={"model": "genserve-mol", "n": 32, "seed": 0})  # warm-up
        for r in range(repeats):
            start = time.perf_counter()
            resp = client.post("/v1/molecules/generations", json={
                "model": "genserve-mol", "n": n, "seed": 1000 + r, "include": ["properties"]})
            seconds = time.perf_counter() - start
            resp.raise_for_status()
            out = resp.json()
            rows.append({"name": "genserve endpoint", "molecules": out["stats"]["returned"], "seconds": seconds,
                         "sampled": out["stats"]["sampled"], "invalid": out["stats"]["invalid"],
                         "duplicates": out["stats"]["duplicates"]})
    return rows


def bench_generate(model_dir: Path, n: int, batch: int, threads: int, seed: int) -> dict:
    """Distinct valid molecules from ``model.generate`` until ``n`` (or, one at a time, ``n``
    sampled strings), with ``batch`` sequences per call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=served_dtype(model_dir))
    model.eval()
    torch.manual_seed(seed)
    bos = torch.tensor([[tok.bos_token_id]])
    seen: set[str] = set()
    sampled = invalid = 0
    start = time.perf_counter()
    while len(seen) < n and sampled < 20 * n:
        with torch.inference_mode():
            out = model.generate(bos, do_sample=True, temperature=1.0, top_k=0, num_return_sequences=batch,
                                 max_new_tokens=model.config.max_position_embeddings - 1,
                                 pad_token_id=tok.pad_token_id)
        for row in out:
            sampled += 1
            smiles = chem.selfies_to_smiles(tok.decode(row[1:], skip_special_tokens=True))
            if smiles is None or chem.mol_from_smiles(smiles) is None:
                invalid += 1
            elif smiles not in seen and len(seen) < n:
                seen.add(smiles)
                chem.properties(chem.mol_from_smiles(smiles))  # the same per-molecule work as the endpoint
    name = "generate, one at a time" if batch == 1 else f"generate, batches of {batch}"
    return {"name": name, "molecules": len(seen), "seconds": time.perf_counter() - start, "sampled": sampled,
            "invalid": invalid, "duplicates": sampled - invalid - len(seen)}


def served_dtype(model_dir: Path) -> torch.dtype:
    """The dtype genserve's ``dtype: auto`` serves this directory in here, so both sides compute alike."""
    return resolve_dtype("auto", torch.device("cpu"), model_dir)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=REPO / "src" / "genserve" / "models" / "weights" / "genserve-mol")
    p.add_argument("--n", type=int, default=1000, help="molecules per endpoint request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sequential", type=int, default=100, help="molecules for generate one at a time")
    p.add_argument("--batch", type=int, default=64, help="num_return_sequences for batched generate")
    p.add_argument("--threads", type=int, default=2, help="threads of the generate baselines")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_genserve(args.model_dir, args.n, args.repeats, args.threads, Path(tmp))
    rows.append(bench_generate(args.model_dir, args.sequential, 1, args.threads, seed=0))
    rows.append(bench_generate(args.model_dir, args.n, args.batch, args.threads, seed=0))
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; {cpu_name()}, {platform.machine()}, "
          f"torch {torch.__version__}; generate in {served_dtype(args.model_dir)}, {args.threads} threads")
    print(f"command: python benchmarks/molecule_serving.py {' '.join(sys.argv[1:])}\n")
    print("| method | valid unique molecules | sampled | invalid | duplicates | seconds | molecules/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['molecules']} | {r['sampled']} | {r['invalid']} | {r['duplicates']} | "
              f"{r['seconds']:.2f} | {r['molecules'] / r['seconds']:.1f} |")
    ours = [r["molecules"] / r["seconds"] for r in rows if r["name"] == "genserve endpoint"]
    best = sorted(ours)[len(ours) // 2]
    print(f"\ngenserve endpoint, median of {len(ours)}: {best:.1f} molecules/s")
    for r in rows[len(ours):]:
        print(f"  {best / (r['molecules'] / r['seconds']):.1f}x {r['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
