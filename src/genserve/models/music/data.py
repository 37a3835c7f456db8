"""The Bach chorales that music21 ships, as four-voice event grids in a normalised key.

Reading: every ``bach/*`` score of the music21 corpus with exactly four parts (soprano, alto, tenor,
bass) in 4/4 becomes a :class:`Chorale`: its notes per voice (MIDI pitch, onset and duration in
quarter notes), the bar lines and the key that music21's default key finding (Krumhansl–Schmuckler
with Aarden–Essen weights) gives. Parsing the ~430 files takes a minute or two, so the result is
cached as JSON under ``~/.cache/genserve/music/``.

Encoding (:func:`encode`): the piece moves to C major or A minor by the smallest shift (-6..+5
semitones), is sampled on an eighth-note grid (a note that starts between two grid points starts at
the earlier one, and of two notes in one grid step the later wins: a pair of sixteenths keeps its
second, a dotted eighth and sixteenth become two eighths) and becomes ``(steps, 4)`` token ids, one
column per voice: a MIDI pitch where a note starts, ``HOLD`` while it sounds on, ``REST`` where the
voice is silent. A second array gives each step's position in its bar (0..7 eighths) so that the
model knows the metre and pickups.

Split: by a stable hash of the corpus file name (BLAKE2b), 10% test, 10% valid, 80% train. The
same melody harmonised in two cantatas counts as two pieces, so a test chorale can share its tune
with a training one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from genserve.models.music.model import BEATS_PER_BAR, HOLD, REST, STEPS_PER_BEAT, pitch_token

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass
class Chorale:
    id: str                           # corpus file stem, e.g. "bwv269"
    tonic: int                        # pitch class of the analysed key
    mode: str                         # "major" | "minor"
    bar_starts: list[float]           # offsets (quarter notes) where bars begin; a pickup's is negative
    length: float                     # quarter notes
    voices: list[list[tuple[int, float, float]]]  # S, A, T, B: (midi pitch, onset, duration)


def cache_path() -> Path:
    return Path.home() / ".cache" / "genserve" / "music" / f"bach-chorales-v{CACHE_VERSION}.json"


def split_of(piece_id: str) -> str:
    bucket = int.from_bytes(hashlib.blake2b(piece_id.encode(), digest_size=4).digest(), "little") % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def load_chorales(split: str | None = None) -> list[Chorale]:
    """The corpus's 4/4 four-part Bach chorales (``split``: only that split), parsed once and cached."""
    path = cache_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        pieces = _parse_corpus()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(p) for p in pieces]))
        tmp.replace(path)
    raw = json.loads(path.read_text())
    pieces = [Chorale(**{**p, "voices": [[tuple(n) for n in v] for v in p["voices"]]}) for p in raw]
    return [p for p in pieces if split is None or split_of(p.id) == split]


def _parse_corpus() -> list[Chorale]:
    from music21 import corpus

    pieces, seen = [], set()
    for file in sorted(corpus.getComposer("bach")):
        piece_id = Path(file).name.removesuffix(".mxl").removesuffix(".xml")
        if piece_id in seen:
            continue
        try:
            chorale = _parse_one(file, piece_id)
        except Exception as exc:  # a handful of corpus files trip music21; skip them, say which
            log.warning("skipping %s: %s", piece_id, exc)
            continue
        if chorale is not None:
            seen.add(piece_id)
            pieces.append(chorale)
    log.info("parsed %d four-part 4/4 chorales from the music21 corpus", len(pieces))
    return pieces


def _parse_one(file: Path, piece_id: str) -> Chorale | None:
    from music21 import corpus

    score = corpus.parse(file)
    if len(score.parts) != 4:
        return None
    signatures = {ts.ratioString for ts in score.recurse().getElementsByClass("TimeSignature")}
    if signatures != {"4/4"}:
        return None
    measures = list(score.parts[0].getElementsByClass("Measure"))
    bar_starts = [float(m.offset) - float(m.paddingLeft or 0.0) for m in measures]
    voices = []
    for part in score.parts:
        notes = []
        for n in part.flatten().notes:
            if n.isChord or n.duration.isGrace:
                continue
            notes.append((int(n.pitch.midi), float(n.offset), float(n.quarterLength)))
        voices.append(notes)
    if any(not v for v in voices):
        return None
    means = [np.mean([p for p, _, _ in v]) for v in voices]
    if means != sorted(means, reverse=True):  # not S, A, T, B from top to bottom
        return None
    key = score.analyze("key")
    return Chorale(piece_id, key.tonic.pitchClass, key.mode, bar_starts, float(score.highestTime), voices)


def normalising_shift(tonic: int, mode: str) -> int:
    """Semitones in -6..+5 that move ``tonic`` to C (major) or A (minor)."""
    target = 0 if mode == "major" else 9
    return (target - tonic + 6) % 12 - 6


def encode(piece: Chorale) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, 4)`` token ids in the normalised key and ``(steps,)`` positions in the bar (eighths)."""
    shift = normalising_shift(piece.tonic, piece.mode)
    grid = 1.0 / STEPS_PER_BEAT
    steps = round(piece.length / grid)
    tokens = np.full((steps, 4), REST, dtype=np.int64)
    for v, notes in enumerate(piece.voices):
        for pitch, onset, duration in notes:
            first, end = int(np.floor(onset / grid + 1e-6)), int(np.floor((onset + duration) / grid + 1e-6))
            if end <= first or first >= steps:
                continue  # shorter than a grid step and not on it: an ornament
            tokens[first, v] = pitch_token(pitch + shift)
            tokens[first + 1:min(end, steps), v] = HOLD
    positions = np.array([_position(i * grid, piece.bar_starts) for i in range(steps)], dtype=np.int64)
    return tokens, positions


def _position(t: float, bar_starts: list[float]) -> int:
    """Position of time ``t`` in its bar, in grid steps (0 = downbeat)."""
    start = max((b for b in bar_starts if b <= t + 1e-6), default=bar_starts[0])
    return round((t - start) * STEPS_PER_BEAT) % (BEATS_PER_BAR * STEPS_PER_BEAT)
