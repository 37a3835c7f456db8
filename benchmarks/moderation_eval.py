"""Precision and recall of genserve's text moderation tiers on a labelled set written for it.

``benchmarks/data/moderation_eval.jsonl``: 330 short texts in eight groups: clear threats, first-person
self-harm intent, slurs, insults, adult sexual content, weapon recipes, 100 benign look-alikes ("how
do I kill a Python process", "the shooting script for our film", news, history, clinical notes, reclaimed
or discussed identity words) and 40 ordinary texts. It was written without looking at the classifiers'
rules, and the classifiers without looking at it.

For each tier (word list, hatesonar, phrase rules, semantic) and for the two combined default policies
(``combined``: every tier, what checks inputs; ``stream``: the three fast tiers, what checks each release
of a stream), each category flagged at a score of 0.5 or more, it reports per harmful group the recall (texts
flagged in that group's categories / texts) and, per category group, precision and recall treating the
group as the positive class; for the benign groups the false-positive rate (texts flagged at all).

The semantic tier's two constants were set on the even half of the set (``--half even``); the odd half
(``--half odd``) is the held-out measurement. ``--data benchmarks/data/moderation_eval_fresh.jsonl`` is a
second set by another author, never tuned on: the measurement of how it carries over to new text.

    .venv/bin/python benchmarks/moderation_eval.py [--half odd] [--show-text] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "moderation_eval.jsonl"
# A harmful group counts as caught when any category of its family is flagged.
FAMILY = {
    "threat": {"harassment/threatening", "violence", "hate/threatening", "illicit/violent", "violence/graphic"},
    "self_harm_intent": {"self-harm", "self-harm/intent", "self-harm/instructions"},
    "slur": {"hate", "hate/threatening", "harassment"},
    "harassment": {"harassment", "harassment/threatening", "hate"},
    "sexual": {"sexual", "sexual/minors"},
    "illicit_violent": {"illicit", "illicit/violent", "violence"},
}
BENIGN = ("benign_lookalike", "benign")
TARGETS = {"threat": 0.9, "self_harm_intent": 0.9, "slur": 0.9}  # the bar for the combined policy
MAX_FPR = 0.05


def flagged(scores: dict[str, float], threshold: float) -> set[str]:
    return {c for c, s in scores.items() if s >= threshold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--half", choices=["all", "even", "odd"], default="all",
                    help="even: the half the semantic tier was tuned on; odd: the held-out half")
    ap.add_argument("--show-text", action="store_true", help="print the misses and false alarms with their text")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from genserve.app.moderation.base import WARM_UP_TEXT
    from genserve.app.moderation.categories import full_scores, merge_scores
    from genserve.app.moderation.semantic import SemanticClassifier
    from genserve.app.moderation.text import PhraseRuleClassifier, SonarClassifier, WordListClassifier

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.half != "all":
        rows = [r for r in rows if int(r["id"].split("-")[1]) % 2 == (0 if args.half == "even" else 1)]
    tiers = {"wordlist": WordListClassifier(), "hatesonar": SonarClassifier(), "rules": PhraseRuleClassifier(),
             "semantic": SemanticClassifier()}
    for t in tiers.values():
        t.scores(WARM_UP_TEXT)  # not timed: the semantic tier loads on its first text long enough
    per_tier: dict[str, list[dict[str, float]]] = {}
    latency: dict[str, float] = {}
    for name, tier in tiers.items():
        start = time.perf_counter()
        per_tier[name] = [tier.scores(r["text"]) for r in rows]
        latency[name] = (time.perf_counter() - start) / len(rows) * 1e6
    per_tier["combined"] = [full_scores(merge_scores(*(per_tier[n][i] for n in tiers))) for i in range(len(rows))]
    per_tier["stream"] = [full_scores(merge_scores(*(per_tier[n][i] for n in tiers if n != "semantic")))
                          for i in range(len(rows))]

    report: dict[str, dict] = {}
    lines = ["| tier | " + " | ".join(f"{g} recall" for g in FAMILY) + " | FPR look-alikes | FPR benign |",
             "|---|" + "---|" * (len(FAMILY) + 2)]
    for name, scores in per_tier.items():
        flags = [flagged(s, args.threshold) for s in scores]
        rec = {g: _mean([bool(f & fam) for r, f in zip(rows, flags, strict=True) if r["group"] == g])
               for g, fam in FAMILY.items()}
        fpr = {g: _mean([bool(f) for r, f in zip(rows, flags, strict=True) if r["group"] == g]) for g in BENIGN}
        prec = {}
        for g, fam in FAMILY.items():  # the group as the positive class, everything else negative
            hits = [r["group"] == g for r, f in zip(rows, flags, strict=True) if f & fam]
            prec[g] = _mean(hits) if hits else float("nan")
        report[name] = {"recall": rec, "precision": prec, "fpr": fpr,
                        "false_negatives": [r["id"] for r, f in zip(rows, flags, strict=True)
                                            if r["group"] in FAMILY and not f & FAMILY[r["group"]]],
                        "false_positives": [r["id"] for r, f in zip(rows, flags, strict=True)
                                            if r["group"] in BENIGN and f]}
        lines.append(f"| {name} | " + " | ".join(f"{rec[g]:.2f}" for g in FAMILY)
                     + f" | {fpr['benign_lookalike']:.3f} | {fpr['benign']:.3f} |")
    lines += ["", "| tier | " + " | ".join(f"{g} precision" for g in FAMILY) + " |", "|---|" + "---|" * len(FAMILY)]
    for name in per_tier:
        lines.append(f"| {name} | " + " | ".join(f"{report[name]['precision'][g]:.2f}" for g in FAMILY) + " |")
    lines += ["", "mean latency per text: " + ", ".join(f"{n} {v:.0f} us" for n, v in latency.items())]
    comb = report["combined"]
    verdict = all(comb["recall"][g] >= bar for g, bar in TARGETS.items()) and comb["fpr"]["benign_lookalike"] <= MAX_FPR
    lines.append(f"combined policy meets the bar (recall >= 0.9 on threats, self-harm intent and slurs; "
                 f"FPR <= {MAX_FPR:.0%} on look-alikes): {'yes' if verdict else 'NO'}")
    print(f"{len(rows)} texts ({args.half}); threshold {args.threshold}")
    print("\n".join(lines))
    by_id = {r["id"]: r for r in rows}
    for kind in ("false_negatives", "false_positives"):
        print(f"\ncombined {kind.replace('_', ' ')} ({len(comb[kind])}): {', '.join(comb[kind]) or '-'}")
        if args.show_text:
            for i in comb[kind]:
                print(f"  {i}: {by_id[i]['text']}")
    if args.json:
        args.json.write_text(json.dumps({"threshold": args.threshold, "latency_us": latency, **report}, indent=2))


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


if __name__ == "__main__":
    main()
