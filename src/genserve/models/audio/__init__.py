"""Audio: text-to-speech (espeak-ng on CPU, transformers TTS models on GPU nodes), the chorale
generator lives in ``models.music``; ``app.serving.media`` encodes samples into the API's formats."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeechSpec:
    """One piece of text to speak. ``voice`` is already resolved to the model's own voice name."""

    text: str
    voice: str
    speed: float = 1.0
    seed: int | None = None


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def split_text(text: str, max_chars: int = 300) -> list[str]:
    """``text`` in pieces of at most ``max_chars``, cut after sentences where possible, else at the
    last space (a single longer word is cut where it must be). Neural TTS models degrade on long
    inputs and a batch pads to its longest member, so they speak text a piece at a time."""
    pieces: list[str] = []
    for sentence in filter(None, (s.strip() for s in _SENTENCE_END.split(text))):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
            pieces[-1] = f"{pieces[-1]} {sentence}"
        elif sentence:
            pieces.append(sentence)
    return pieces
