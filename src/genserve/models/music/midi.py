"""A piece as a Standard MIDI File (type 1), written by hand: no MIDI library needed to serve.

Track 0 is the conductor track (time signature 4/4, the key signature of the requested key, the
tempo); tracks 1-4 hold soprano, alto, tenor and bass, each on its own channel with a church-organ
program. 480 ticks per quarter note; the bytes depend only on the piece.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genserve.models.music.generator import Piece

TICKS_PER_BEAT = 480
VELOCITY = 80
PROGRAM = 19  # General MIDI "Church Organ" (0-based)
TRACK_NAMES = ("Soprano", "Alto", "Tenor", "Bass")
_LETTER_FIFTHS = {"F": -1, "C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5}


def key_signature(key: str) -> tuple[int, int]:
    """``"F# minor"`` -> (sharps, minor flag) = (3, 1); flats are negative. A spelling past seven
    sharps or flats (``"G# major"``) takes its enharmonic signature (Ab major: -4)."""
    tonic, mode = key.split()
    fifths = _LETTER_FIFTHS[tonic[0].upper()] + 7 * (tonic.count("#") - tonic[1:].count("b"))
    fifths -= 3 if mode == "minor" else 0
    if fifths > 7:
        fifths -= 12
    elif fifths < -7:
        fifths += 12
    return fifths, int(mode == "minor")


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    while value := value >> 7:
        out.append(0x80 | (value & 0x7F))
    return bytes(reversed(out))


def _track(events: list[tuple[int, int, bytes]]) -> bytes:
    """(tick, order, message) events -> an MTrk chunk; at equal ticks lower ``order`` comes first."""
    body, now = bytearray(), 0
    for tick, _, message in sorted(events, key=lambda e: (e[0], e[1])):
        body += _varlen(tick - now) + message
        now = tick
    body += b"\x00\xff\x2f\x00"  # end of track
    return b"MTrk" + struct.pack(">I", len(body)) + bytes(body)


def _meta(kind: int, data: bytes) -> bytes:
    return bytes([0xFF, kind]) + _varlen(len(data)) + data


def to_midi(piece: Piece) -> bytes:
    """The piece as MIDI file bytes, cut at its ``seconds``."""
    sharps, minor = key_signature(piece.key)
    micros = round(60_000_000 / piece.tempo)
    conductor = [(0, 0, _meta(0x03, b"genserve-music")),
                 (0, 1, _meta(0x58, bytes([4, 2, 24, 8]))),  # 4/4, 24 clocks per click, 8 32nds per quarter
                 (0, 2, _meta(0x59, struct.pack(">bB", sharps, minor))),
                 (0, 3, _meta(0x51, micros.to_bytes(3, "big")))]
    end = round(piece.seconds * piece.tempo / 60 * TICKS_PER_BEAT)
    tracks = [_track(conductor)]
    for channel, (name, notes) in enumerate(zip(TRACK_NAMES, piece.voices, strict=True)):
        events = [(0, 0, _meta(0x03, name.encode())), (0, 1, bytes([0xC0 | channel, PROGRAM]))]
        for note in notes:
            on = round(note.start * TICKS_PER_BEAT)
            off = min(round((note.start + note.duration) * TICKS_PER_BEAT), end)
            if on >= off:
                continue
            events.append((on, 3, bytes([0x90 | channel, note.pitch, VELOCITY])))
            events.append((off, 2, bytes([0x80 | channel, note.pitch, 0])))  # offs before ons at a tick
        tracks.append(_track(events))
    header = b"MThd" + struct.pack(">IHHH", 6, 1, len(tracks), TICKS_PER_BEAT)
    return header + b"".join(tracks)
