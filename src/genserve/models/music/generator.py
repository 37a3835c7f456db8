"""``chorale``: four-part chorales in the style of J. S. Bach, as notes, audio and MIDI.

``load(path, device, dtype)`` gives a :class:`ChoraleGenerator`; ``generate`` turns
:class:`MusicSpec` requests (length, tempo, key, temperature, seed) into :class:`Piece` objects in
one batched sampling run; ``render`` (``synth``) makes audio of a piece and ``to_midi`` (``midi``) a
MIDI file. The network (``model``) writes in C major or A minor; a piece moves to the requested
tonic by the smaller shift (-6..+5 semitones), and by default each voice samples only pitches that
land in its range (:data:`VOICE_RANGES`) there and no pitch that moves in parallel fifths or octaves
with a voice above it. Serving never imports music21.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from genserve.models.music.model import (
    BOS,
    HOLD,
    MODES,
    PAD,
    STEPS_PER_BEAT,
    VOCAB_SIZE,
    ChoraleConfig,
    ChoraleTransformer,
    pitch_token,
    sample,
    token_pitch,
)

# Standard SATB ranges (MIDI, inclusive): S C4-G5, A G3-D5, T C3-G4, B E2-C4.
VOICE_RANGES = ((60, 79), (55, 74), (48, 67), (40, 60))
KEY_FORM = "a tonic A-G with an optional # or b, a space, then major or minor (e.g. 'F# minor', 'Bb major')"
_KEY = re.compile(r"\s*([A-Ga-g])([#b♯♭]?)\s+(major|minor)\s*", re.IGNORECASE)
_LETTER_PC = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def parse_key(key: str) -> tuple[int, str]:
    """``"F# minor"`` -> ``(6, "minor")``: the tonic's pitch class and the mode."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(f"invalid key {key!r}: expected {KEY_FORM}")
    letter, accidental, mode = m.groups()
    alter = {"": 0, "#": 1, "♯": 1, "b": -1, "♭": -1}[accidental]
    return (_LETTER_PC[letter.upper()] + alter) % 12, mode.lower()


def key_name(key: str) -> str:
    """The canonical spelling of a valid key: ``"f#  MINOR"`` -> ``"F# minor"``."""
    letter, accidental, mode = _KEY.fullmatch(key).groups()
    return f"{letter.upper()}{accidental.replace('♯', '#').replace('♭', 'b')} {mode.lower()}"


@dataclass
class MusicSpec:
    seconds: float = 20.0      # 1..60
    tempo: float = 90.0        # quarter notes per minute, 30..240
    key: str = "C major"
    temperature: float = 1.0   # > 0
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the field and the bad value."""
        if not 1 <= self.seconds <= 60:
            raise ValueError(f"seconds must be between 1 and 60, got {self.seconds}")
        if not 30 <= self.tempo <= 240:
            raise ValueError(f"tempo must be between 30 and 240 bpm, got {self.tempo}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not isinstance(self.seed, int) or not -2**63 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        parse_key(self.key)

    @property
    def beats(self) -> int:
        """Whole beats that cover ``seconds`` at ``tempo``."""
        return math.ceil(self.seconds * self.tempo / 60 - 1e-9)


@dataclass(frozen=True)
class Note:
    pitch: int        # MIDI
    start: float      # beats (quarter notes) from the start
    duration: float   # beats


@dataclass
class Piece:
    voices: tuple[tuple[Note, ...], ...]  # soprano, alto, tenor, bass
    tempo: float
    tonic: int        # pitch class
    mode: str         # "major" | "minor"
    key: str          # canonical spelling, e.g. "F# minor"
    seconds: float


def transposition(tonic: int, mode: str) -> int:
    """Semitones (-6..+5) from the model's C major / A minor to ``tonic``."""
    return (tonic - (0 if mode == "major" else 9) + 6) % 12 - 6


class ChoraleGenerator:
    sample_rate = 22050

    def __init__(self, model: ChoraleTransformer, device: torch.device, dtype: torch.dtype,
                 clamp_ranges: bool = True, avoid_parallels: bool = True) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        # Serving-time rules on top of the network; evaluation turns them off to measure it alone.
        self.clamp_ranges, self.avoid_parallels = clamp_ranges, avoid_parallels

    parse_key = staticmethod(parse_key)

    def generate(self, specs: list[MusicSpec], on_step: Callable[[int, int], None] | None = None) -> list[Piece]:
        """The pieces ``specs`` ask for, in one batched run; ``on_step(step, steps)`` after each grid step
        (what it raises stops the run)."""
        # 1. check the inputs
        for spec in specs:
            spec.check()
        if not specs:
            return []
        # 2. per piece: mode, shift to the requested key, allowed tokens per voice, its own generator
        keys = [parse_key(s.key) for s in specs]
        shifts = [transposition(tonic, mode) for tonic, mode in keys]
        modes = torch.tensor([MODES.index(mode) for _, mode in keys], device=self.device)
        allowed = torch.stack([self._allowed(shift) for shift in shifts]).to(self.device)  # (B, 4, vocab)
        generators = [torch.Generator(device=self.device).manual_seed(s.seed) for s in specs]
        # 3. one batched run for the longest piece; shorter ones are its prefixes
        steps = max(s.beats for s in specs) * STEPS_PER_BEAT
        tokens = sample(self.model, modes, steps, [s.temperature for s in specs], generators, allowed,
                        self.avoid_parallels, on_step).cpu()
        # 4. tokens -> notes in the requested key
        return [self._piece(tokens[b, :s.beats * STEPS_PER_BEAT], s, keys[b], shifts[b])
                for b, s in enumerate(specs)]

    def _allowed(self, shift: int) -> torch.Tensor:
        ok = torch.ones(4, VOCAB_SIZE, dtype=torch.bool)
        ok[:, [PAD, BOS]] = False
        if self.clamp_ranges:
            ok[:, 4:] = False
            for v, (lo, hi) in enumerate(VOICE_RANGES):
                ok[v, [pitch_token(p - shift) for p in range(lo, hi + 1)]] = True
        return ok

    @staticmethod
    def _piece(tokens: torch.Tensor, spec: MusicSpec, key: tuple[int, str], shift: int) -> Piece:
        voices = tuple(tuple(Note(p + shift, s, d) for p, s, d in decode_voice(tokens[:, v].tolist()))
                       for v in range(4))
        return Piece(voices, float(spec.tempo), key[0], key[1], key_name(spec.key), float(spec.seconds))


def decode_voice(tokens: list[int]) -> list[tuple[int, float, float]]:
    """One voice's tokens -> (MIDI pitch, start, duration) in beats; a HOLD after a rest is a rest."""
    notes: list[list] = []
    sounding = False
    for i, t in enumerate(tokens):
        if (pitch := token_pitch(t)) is not None:
            notes.append([pitch, i / STEPS_PER_BEAT, 1 / STEPS_PER_BEAT])
            sounding = True
        elif t == HOLD and sounding:
            notes[-1][2] += 1 / STEPS_PER_BEAT
        else:
            sounding = False
    return [tuple(n) for n in notes]


def load(path: Path, device: torch.device, dtype: torch.dtype) -> ChoraleGenerator:
    """The generator saved in ``path`` (``config.json`` + ``model.safetensors``)."""
    config = json.loads((Path(path) / "config.json").read_text())
    fields = ChoraleConfig.__dataclass_fields__
    model = ChoraleTransformer(ChoraleConfig(**{k: v for k, v in config.items() if k in fields}))
    state = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return ChoraleGenerator(model, device, dtype)


def save_model(model: ChoraleTransformer, out: Path, extra: dict | None = None) -> None:
    """``config.json`` + float16 ``model.safetensors``."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"family": "chorale", "architecture": "ChoraleTransformer", "dtype": "float16",
              **asdict(model.cfg), "extra": extra or {}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def make_tiny(path: Path) -> None:
    """A tiny seeded network saved in ``path`` (the family contract test's instance)."""
    torch.manual_seed(0)
    save_model(ChoraleTransformer(ChoraleConfig(n_layer=1, n_head=2, d_model=32, context=64)), path)
