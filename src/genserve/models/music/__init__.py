"""``chorale``: four-part chorales in the style of J. S. Bach, as notes, audio and MIDI.

``generator`` holds the family's ``load`` and :class:`~genserve.models.music.generator.ChoraleGenerator`;
``model`` the network, ``synth`` and ``midi`` the renderings, ``data``, ``train`` and ``evaluate``
the rest. Serving never imports music21.
"""

from genserve.models.music.generator import (
    VOICE_RANGES,
    ChoraleGenerator,
    MusicSpec,
    Note,
    Piece,
    load,
    make_tiny,
    parse_key,
)
from genserve.models.music.synth import render

__all__ = ["VOICE_RANGES", "ChoraleGenerator", "MusicSpec", "Note", "Piece", "load", "make_tiny", "parse_key",
           "render"]
