"""Audio: text-to-speech (espeak-ng on CPU, transformers TTS models on GPU nodes), the chorale
generator lives in ``models.music``; ``app.serving.media`` encodes samples into the API's formats."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeechSpec:
    """One piece of text to speak. ``voice`` is already resolved to the model's own voice name."""

    text: str
    voice: str
    speed: float = 1.0
    seed: int | None = None


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
# What joins, varies or tints a pictograph: zero-width joiner, variation selectors, the keycap, skin tones.
_PICTOGRAPH_PARTS = {0x200D, 0xFE0E, 0xFE0F, 0x20E3, *range(0x1F3FB, 0x1F400)}
# The blocks emoji live in: miscellaneous symbols and dingbats, symbols and arrows, and the supplementary
# planes' pictographs (emoticons, transport, flags' regional indicators, ...).
_PICTOGRAPH_BLOCKS = ((0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x1F000, 0x1FAFF))


def _pictograph(c: str) -> bool:
    cp = ord(c)
    return cp in _PICTOGRAPH_PARTS or (unicodedata.category(c) == "So"
                                       and any(lo <= cp <= hi for lo, hi in _PICTOGRAPH_BLOCKS))


def speakable(text: str) -> str:
    """``text`` without its pictographs (emoji and dingbats) and their joiners, as a reader would skip
    them: espeak-ng reads an emoji's name aloud, so 4,096 emoji became 30 minutes of audio (a 32 MB
    WAV) from a 16 KB request. Letters, digits, punctuation and symbols that are words (°, ©, №) stay."""
    return re.sub(r"[ \t]{2,}", " ", "".join(c for c in text if not _pictograph(c))).strip()


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
