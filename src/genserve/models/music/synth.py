"""A small additive synthesiser for the four voices: an organ-like tone, fast and deterministic.

Each voice reads one period of a fixed harmonic spectrum from a wavetable (soft, flute- and
principal-like stops: a strong fundamental, a few decaying harmonics, the bass a little brighter so
it carries), with a slow vibrato, an ADSR envelope per note and a short release that overlaps the
next note. The mix goes through a gentle low-pass, is normalised to a peak of 0.9 and fades out over
its last moments. No randomness anywhere: the same piece gives the same samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.signal import butter, sosfilt

if TYPE_CHECKING:
    from genserve.models.music.generator import Piece

TABLE_SIZE = 4096
# Relative amplitudes of harmonics 1..n per voice (S, A, T, B) and each voice's level in the mix.
SPECTRA = ((1.0, 0.45, 0.25, 0.12, 0.08, 0.04), (1.0, 0.5, 0.28, 0.14, 0.08, 0.04),
           (1.0, 0.55, 0.3, 0.18, 0.1, 0.05), (1.0, 0.7, 0.45, 0.3, 0.18, 0.1, 0.06))
LEVELS = (1.0, 0.75, 0.75, 0.9)
ATTACK, DECAY, SUSTAIN, RELEASE = 0.03, 0.12, 0.8, 0.09  # seconds, seconds, level, seconds
VIBRATO_HZ, VIBRATO_DEPTH = 5.0, 0.003  # relative pitch deviation
LOWPASS_HZ = 4000.0
PEAK = 0.9
FADE_SECONDS = 0.5


def _wavetables() -> list[np.ndarray]:
    phase = np.arange(TABLE_SIZE) / TABLE_SIZE
    tables = []
    for spectrum in SPECTRA:
        wave = sum(a * np.sin(2 * np.pi * (h + 1) * phase) for h, a in enumerate(spectrum))
        tables.append((wave / np.abs(wave).max()).astype(np.float32))
    return tables


TABLES = _wavetables()


def midi_hz(pitch: int) -> float:
    return 440.0 * 2 ** ((pitch - 69) / 12)


def envelope(n_sound: int, n_total: int, sr: int) -> np.ndarray:
    """ADSR over ``n_sound`` samples of the held note, then the release up to ``n_total``."""
    t = np.arange(n_total, dtype=np.float32) / sr
    env = np.where(t < ATTACK, t / ATTACK,
                   np.where(t < ATTACK + DECAY, 1 - (1 - SUSTAIN) * (t - ATTACK) / DECAY, SUSTAIN))
    held = env[min(n_sound, n_total) - 1] if n_sound > 0 else 0.0
    tail = t >= n_sound / sr
    env[tail] = held * np.maximum(0.0, 1 - (t[tail] - n_sound / sr) / RELEASE)
    return env.astype(np.float32)


def render_voice(notes, voice: int, tempo: float, n: int, sr: int) -> np.ndarray:
    """One voice's notes (pitch, start and duration in beats) as ``n`` samples."""
    out = np.zeros(n, dtype=np.float32)
    beat = 60.0 / tempo
    table = TABLES[voice]
    for note in notes:
        start = round(note.start * beat * sr)
        if start >= n:
            continue
        n_sound = round(note.duration * beat * sr)
        n_total = min(n_sound + int(RELEASE * sr), n - start)
        t = np.arange(n_total, dtype=np.float64) / sr
        # The phase of a vibrato-modulated sine, integrated in closed form (no per-sample cumsum).
        f = midi_hz(note.pitch)
        phase = f * t - f * VIBRATO_DEPTH / (2 * np.pi * VIBRATO_HZ) * np.cos(2 * np.pi * VIBRATO_HZ * t + voice)
        idx = ((phase % 1.0) * TABLE_SIZE).astype(np.int64) % TABLE_SIZE
        out[start:start + n_total] += table[idx] * envelope(n_sound, n_total, sr)
    return out


def render(piece: Piece, sample_rate: int) -> np.ndarray:
    """The piece as float32 mono audio in [-1, 1], exactly ``round(seconds * sample_rate)`` samples."""
    n = round(piece.seconds * sample_rate)
    mix = np.zeros(n, dtype=np.float32)
    for v, notes in enumerate(piece.voices):
        mix += LEVELS[v] * render_voice(notes, v, piece.tempo, n, sample_rate)
    mix = sosfilt(butter(2, min(LOWPASS_HZ, 0.45 * sample_rate), fs=sample_rate, output="sos"), mix)
    peak = float(np.abs(mix).max()) if n else 0.0
    if peak > 0:
        mix *= PEAK / peak
    fade = min(int(FADE_SECONDS * sample_rate), n)
    if fade > 0:
        mix[n - fade:] *= np.cos(np.linspace(0, np.pi / 2, fade)) ** 2
    return np.clip(mix, -1.0, 1.0).astype(np.float32)
