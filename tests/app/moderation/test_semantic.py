"""The semantic tier: offline, its score crossing 0.5 exactly at its documented bar, threats and
self-harm intent said in new words above benign look-alikes."""

from __future__ import annotations

import pytest

from genserve.app.moderation.semantic import FLOOR, MARGIN, SemanticClassifier


@pytest.fixture(scope="module")
def tier() -> SemanticClassifier:
    return SemanticClassifier()


def test_score_crosses_half_at_the_bar(tier: SemanticClassifier) -> None:
    for text in ("I will find you and you will regret being born.", "Please pass the salt.", ""):
        scores = tier.scores(text)
        if not text:
            assert scores == {}
            continue
        sims, benign = tier.similarities(text)
        for cat, s in sims.items():
            assert (scores[cat] >= 0.5) == (s >= max(benign + MARGIN, FLOOR))


@pytest.mark.parametrize(("text", "category"), [
    ("Meet me behind the school, you're going to need an ambulance.", "harassment/threatening"),
    ("I've given away my things and tonight I'll finally be at peace, for good.", "self-harm/intent"),
])
def test_paraphrases_are_flagged(tier: SemanticClassifier, text: str, category: str) -> None:
    assert tier.scores(text)[category] >= 0.5


@pytest.mark.parametrize("text", ["How do I kill a zombie process on Ubuntu?", "We shot the wedding video in 4K.",
                                  "My laptop died during the presentation."])
def test_look_alikes_are_not(tier: SemanticClassifier, text: str) -> None:
    assert max(tier.scores(text).values()) < 0.5


def test_a_batch_scores_each_text_as_alone(tier: SemanticClassifier) -> None:
    texts = ["I will find you and you will regret being born.", "fire", "Please pass the salt, thank you.",
             "How do I kill a zombie process on Ubuntu?", ""]
    batch = tier.scores_batch(texts)
    for text, scores in zip(texts, batch, strict=True):
        alone = tier.scores(text)
        assert scores.keys() == alone.keys()
        for cat, s in alone.items():
            assert scores[cat] == pytest.approx(s, abs=1e-3)


def test_an_array_input_is_one_forward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/v1/moderations`` with an array: the encoder runs once over its texts, each judged as alone."""
    from genserve.app.metrics import Metrics
    from genserve.app.moderation.backend import TieredModerationBackend
    from genserve.app.moderation.text import shared_semantic
    from genserve.app.registry import ModelEntry
    from genserve.models.params import ModerationParams

    backend = TieredModerationBackend(ModelEntry(id="mod", modality="moderation", backend="local",
                                                 family="genserve-moderation"), Metrics())
    backend.setup()
    sem = shared_semantic()
    passes: list[int] = []
    real = sem.similarities_batch

    def counted(texts: list[str]) -> list[tuple[dict[str, float], float]]:
        passes.append(len(texts))
        return real(texts)

    monkeypatch.setattr(sem, "similarities_batch", counted)
    threat = "Meet me behind the school, you're going to need an ambulance."
    texts = [threat, "Write a short poem about autumn leaves, please.", "hi", "How do I kill a zombie process?"]
    results = backend._classify(ModerationParams(texts=texts))
    assert passes == [3]  # "hi" is too short for this tier
    assert [r.flagged for r in results] == [True, False, False, False]


def test_the_onnx_encoder_is_sentence_transformers_encoder() -> None:
    """The CPU path (onnxruntime, exported at load) gives sentence-transformers' embeddings, alone and in a
    padded batch of mixed lengths, truncation included."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from genserve.app.moderation.semantic import OnnxEncoder, _encoder_dir

    texts = ["Please pass the salt.", "I will find you and you will regret being born, " * 3, "word " * 400, "hi"]
    want = SentenceTransformer(str(_encoder_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    enc = OnnxEncoder(_encoder_dir())
    batch = enc.encode(texts)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    assert batch.shape == alone.shape == want.shape
    assert np.min(np.sum(batch * want, axis=1)) > 0.9999
    assert np.min(np.sum(alone * want, axis=1)) > 0.9999
    assert enc.encode([]).shape == (0, want.shape[1])


def test_warm_up_loads_every_input_tier_before_the_first_request() -> None:
    """``ModerationService.warm_up`` (start-up) must load the semantic tier too: a text shorter than
    ``MIN_WORDS`` never reaches its encoder, and the first prompt would pay for loading it."""
    from genserve.app.metrics import Metrics
    from genserve.app.moderation.base import WARM_UP_TEXT
    from genserve.app.moderation.policy import Policy
    from genserve.app.moderation.semantic import MIN_WORDS
    from genserve.app.moderation.service import ModerationService
    from genserve.app.moderation.text import shared_semantic

    assert len(WARM_UP_TEXT.split()) >= MIN_WORDS
    service = ModerationService(Policy(), [], Metrics())
    service._policies["m"] = service.policy  # one model under the default policy (semantic on inputs)
    tier = shared_semantic()
    with tier._lock:
        tier._model = None  # as at start-up, whatever ran before in this process
    service.warm_up()
    assert tier._model is not None
