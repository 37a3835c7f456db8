"""The text watermark on the embedded model: detection rates, what it costs in perplexity, and in
throughput.

- **Detection.** For each temperature, ``--samples`` answers of ``--tokens`` tokens (end of sequence
  ignored) to questions about held-out documents, made with the watermark and without. Each is
  decoded and scored as ``/v1/provenance/verify`` scores a pasted text (decoded, tokenized again).
  The false-positive rate is measured on human-written text of the same kind: the model's held-out
  corpus (documents its training never saw), cut into windows of the same length.
- **Perplexity.** The unwatermarked model's perplexity of the tokens each sampled answer drew, with
  the watermark against without (the paper's measure of quality cost).
- **Throughput.** Output tokens/s of the engine with 32 sequences running, watermark on against
  off, in one process, alternating rounds.

    .venv/bin/python benchmarks/watermark.py --json /tmp/watermark.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time

import torch
import torch.nn.functional as F

from genserve.models.common.loading import weights_dir
from genserve.models.llama import load
from genserve.models.llama.corpus import documents
from genserve.models.text.engine import EngineConfig, LLMEngine
from genserve.models.text.generate import TextModel
from genserve.models.text.sampling import SamplingParams
from genserve.models.text.watermark import Watermark, detect, key_from_secret

KEY = key_from_secret("benchmark secret\0genserve-text-tiny")
MARK = Watermark(KEY)


def run(tm: TextModel, prompts: list[list[int]], params: list[SamplingParams], max_seqs: int = 64) -> list[list[int]]:
    engine = LLMEngine(tm, EngineConfig.for_model(tm.context, max_num_seqs=max_seqs))
    out: dict[int, list[int]] = {}

    def collect(i: int):
        def on_event(ev) -> None:
            for o in ev.outputs:
                out.setdefault(i, []).append(o.token.token_id)
        return on_event

    for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), ids, p, collect(i))
    while engine.has_work():
        engine.step()
    return [out[i] for i in range(len(prompts))]


def rescored(tm: TextModel, tokens: list[int]) -> float:
    """The z-score of the text those tokens decode to, tokenized again, as /v1/provenance/verify sees it."""
    text = tm.tokenizer.decode(tokens, skip_special_tokens=True)
    return detect(tm.tokenizer(text, add_special_tokens=False)["input_ids"], MARK, tm.logits_width).z_score


@torch.no_grad()
def perplexity(tm: TextModel, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """exp of the mean NLL, under the model alone, of the tokens each answer drew."""
    assert tm.model is not None
    total, count = 0.0, 0
    for ids, out in zip(prompts, outputs, strict=True):
        seq = torch.tensor([ids + out])
        logits = tm.model(seq[:, :-1])[0, len(ids) - 1:]
        total += F.cross_entropy(logits.float(), seq[0, len(ids):], reduction="sum").item()
        count += len(out)
    return math.exp(total / count)


def human_windows(tm: TextModel, tokens: int, held_out: bool) -> list[str]:
    """Consecutive windows of the corpus's documents (its held-out ones, or all of them)."""
    ids: list[int] = []
    for d in documents():
        if d.held_out or not held_out:
            ids += tm.tokenizer(d.text, add_special_tokens=False)["input_ids"]
    return [tm.tokenizer.decode(ids[i:i + tokens]) for i in range(0, len(ids) - tokens, tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperatures", default="0.7,0.85,1.0")
    ap.add_argument("--gamma", type=float, default=Watermark.gamma)
    ap.add_argument("--delta", type=float, default=Watermark.delta)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--throughput-only", action="store_true", help="skip the detection and perplexity rows")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global MARK
    MARK = Watermark(KEY, gamma=args.gamma, delta=args.delta)
    tm = load(weights_dir() / "genserve-text-tiny", torch.device("cpu"), torch.float32)
    questions = [d.question for d in documents() if d.held_out and d.question]
    random.Random(0).shuffle(questions)
    prompts = [tm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
               for q in (questions * (1 + args.samples // len(questions)))[:args.samples]]
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
                    "samples": args.samples, "tokens": args.tokens, "gamma": MARK.gamma, "delta": MARK.delta,
                    "z_threshold": MARK.z_threshold, "rows": []}

    for name, held_out in () if args.throughput_only else (("human_heldout", True), ("human_all", False)):
        human = sorted(detect(tm.tokenizer(w, add_special_tokens=False)["input_ids"], MARK, tm.logits_width).z_score
                       for w in human_windows(tm, args.tokens, held_out))
        fp = sum(z > MARK.z_threshold for z in human)
        result[name] = {"windows": len(human), "false_positives": fp, "fpr": fp / len(human),
                        "z_99th_percentile": human[int(0.99 * len(human))], "max_z": human[-1]}
        print(f"{name}: {len(human)} windows of {args.tokens} tokens, {fp} above z={MARK.z_threshold}, "
              f"99th percentile z {human[int(0.99 * len(human))]:.2f}, max {human[-1]:.2f}", flush=True)

    for t in [] if args.throughput_only else map(float, args.temperatures.split(",")):
        rows = {}
        for name, mark in (("off", None), ("on", MARK)):
            params = [SamplingParams(max_tokens=args.tokens, temperature=t, seed=i, ignore_eos=True, watermark=mark)
                      for i in range(args.samples)]
            outs = run(tm, prompts, params)
            zs = [rescored(tm, o) for o in outs]
            rows[name] = {"detected": sum(z > MARK.z_threshold for z in zs) / len(zs),
                          "median_z": sorted(zs)[len(zs) // 2], "perplexity": perplexity(tm, prompts, outs)}
        row = {"temperature": t, "tpr": rows["on"]["detected"], "fpr_unmarked_model_text": rows["off"]["detected"],
               "median_z_on": rows["on"]["median_z"], "median_z_off": rows["off"]["median_z"],
               "perplexity_off": rows["off"]["perplexity"], "perplexity_on": rows["on"]["perplexity"]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)

    # Throughput: 32 sequences at once, alternating off/on rounds so drift hits both alike.
    stream_prompts, times = (prompts * 32)[:32], {"off": 0.0, "on": 0.0}
    for _ in range(3):
        for name, mark in (("off", None), ("on", MARK)):
            params = [SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=i, ignore_eos=True, watermark=mark)
                      for i in range(32)]
            t0 = time.perf_counter()
            run(tm, stream_prompts, params)
            times[name] += time.perf_counter() - t0
    tokens = 3 * 32 * args.tokens
    result["throughput"] = {k: tokens / v for k, v in times.items()}
    result["throughput"]["ratio_on_off"] = times["off"] / times["on"]
    print(json.dumps(result["throughput"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
