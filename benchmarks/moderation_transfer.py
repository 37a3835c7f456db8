"""How the input policy's recall and false positives carry over to texts written by someone else, and
what labelled examples would buy: the semantic tier's rule with the shipped prototypes, and with the
texts of the training sets added as prototypes (nearest neighbour, same FLOOR and MARGIN).

    .venv/bin/python benchmarks/moderation_transfer.py --train benchmarks/data/moderation_eval.jsonl \\
        --test benchmarks/data/moderation_eval_fresh.jsonl

``combined`` is the input policy (the fast tiers' flags joined with the semantic tier's), as in
``moderation_eval.py``; a text counts as caught when a category of its group's family is flagged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from moderation_eval import BENIGN, FAMILY, flagged

# The semantic category a labelled group's texts stand for when they are used as prototypes.
PROTOTYPE_OF = {"threat": "harassment/threatening", "self_harm_intent": "self-harm/intent", "slur": "hate",
                "harassment": "harassment", "sexual": "sexual", "illicit_violent": "illicit/violent",
                "benign_lookalike": "benign", "benign": "benign"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, nargs="*", default=[], help="labelled sets whose texts become prototypes")
    ap.add_argument("--test", type=Path, required=True)
    args = ap.parse_args()

    from importlib import resources

    from genserve.app.moderation.categories import full_scores, merge_scores
    from genserve.app.moderation.semantic import FLOOR, MARGIN, MIN_WORDS, OnnxEncoder, _encoder_dir
    from genserve.app.moderation.text import PhraseRuleClassifier, SonarClassifier, WordListClassifier

    def rows_of(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    encoder = OnnxEncoder(_encoder_dir())
    raw = yaml.safe_load(resources.files("genserve.app.moderation").joinpath("data/prototypes.yaml").read_text())
    shipped = [(cat, text) for cat, texts in raw.items() for text in texts]
    labelled = [(PROTOTYPE_OF[r["group"]], r["text"]) for path in args.train for r in rows_of(path)]
    test = rows_of(args.test)
    fast = [WordListClassifier(), SonarClassifier(), PhraseRuleClassifier()]
    fast_flags = [flagged(full_scores(merge_scores(*(t.scores(r["text"]) for t in fast))), 0.5) for r in test]
    emb = encoder.encode([r["text"] for r in test])
    long = np.array([len(r["text"].split()) >= MIN_WORDS for r in test])

    def semantic_flags(protos: list[tuple[str, str]]) -> list[set[str]]:
        cats = np.array([c for c, _ in protos])
        sims = emb @ encoder.encode([t for _, t in protos]).T
        benign = sims[:, cats == "benign"].max(axis=1)
        return [{c for c in set(cats) - {"benign"} if sims[i, cats == c].max() >= max(benign[i] + MARGIN, FLOOR)}
                if long[i] else set() for i in range(len(test))]

    print(f"test: {args.test.name} ({len(test)} texts); train: {', '.join(p.name for p in args.train) or '-'}")
    print("| prototypes | " + " | ".join(f"{g} recall" for g in ("threat", "self_harm_intent", "slur"))
          + " | FPR look-alikes | FPR benign |")
    print("|---|---|---|---|---|---|")
    variants = {"shipped": shipped}
    if labelled:
        variants[f"shipped + {len(labelled)} labelled texts"] = shipped + labelled
    for name, protos in variants.items():
        flags = [f | s for f, s in zip(fast_flags, semantic_flags(protos), strict=True)]
        recall = [np.mean([bool(f & FAMILY[g]) for r, f in zip(test, flags, strict=True) if r["group"] == g])
                  for g in ("threat", "self_harm_intent", "slur")]
        fpr = [np.mean([bool(f) for r, f in zip(test, flags, strict=True) if r["group"] == g]) for g in BENIGN]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in recall) + " | " + " | ".join(f"{v:.3f}" for v in fpr)
              + " |")


if __name__ == "__main__":
    main()
