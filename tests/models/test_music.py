"""The ``chorale`` family: keys, sampling (seeds, batch invariance, ranges), audio, MIDI, training."""

from __future__ import annotations

import io
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.models.common.loading import weights_dir
from genserve.models.music import VOICE_RANGES, ChoraleGenerator, MusicSpec, Piece, load, parse_key, render
from genserve.models.music.data import Chorale, encode, normalising_shift
from genserve.models.music.midi import key_signature, to_midi
from genserve.models.music.model import BOS, HOLD, REST, ChoraleConfig, ChoraleTransformer, pitch_token
from genserve.models.music.train import MusicTrainConfig, batch_loss

SHIPPED = weights_dir() / "genserve-music"


@pytest.fixture(scope="module")
def gen() -> ChoraleGenerator:
    """The shipped weights when present, else a tiny seeded random network."""
    torch.set_num_threads(1)
    if (SHIPPED / "model.safetensors").is_file():
        return load(SHIPPED, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    return ChoraleGenerator(ChoraleTransformer(ChoraleConfig(n_layer=1, n_head=2, d_model=32, context=64)),
                            torch.device("cpu"), torch.float32)


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((audio * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize(("key", "expected"), [("D major", (2, "major")), ("F# minor", (6, "minor")),
                                               ("Bb major", (10, "major")), ("C minor", (0, "minor")),
                                               ("  eb   MINOR ", (3, "minor")), ("Cb major", (11, "major"))])
def test_parse_key(key: str, expected: tuple[int, str]) -> None:
    assert parse_key(key) == expected


@pytest.mark.parametrize("key", ["H major", "C dorian", "C", "", "C## major", "Cmajor", "major C"])
def test_parse_key_rejects_with_the_accepted_form(key: str) -> None:
    with pytest.raises(ValueError, match=r"invalid key .*tonic A-G with an optional # or b.*major or minor"):
        parse_key(key)


@pytest.mark.parametrize(("field", "value"), [("seconds", 0.5), ("seconds", 61), ("tempo", 20), ("tempo", 300),
                                              ("temperature", 0.0), ("key", "X major"),
                                              ("seed", 2**64), ("seed", 1.5)])
def test_generate_checks_its_inputs(gen: ChoraleGenerator, field: str, value) -> None:
    with pytest.raises(ValueError, match=field if field != "key" else "invalid key"):
        gen.generate([MusicSpec(**{field: value})])


def test_seed_determinism_and_batch_invariance(gen: ChoraleGenerator) -> None:
    spec = MusicSpec(seconds=6, tempo=120, key="F# minor", temperature=1.0, seed=7)
    alone = gen.generate([spec])[0]
    others = [MusicSpec(seconds=9, tempo=96, key="Bb major", temperature=0.8, seed=1),
              MusicSpec(seconds=3, tempo=200, key="C major", temperature=1.3, seed=7)]
    batched = gen.generate([others[0], spec, others[1]])
    assert to_midi(batched[1]) == to_midi(alone)
    rate = gen.sample_rate
    assert wav_bytes(render(batched[1], rate), rate) == wav_bytes(render(alone, rate), rate)
    assert render(batched[1], rate).tobytes() == render(alone, rate).tobytes()
    assert gen.generate([MusicSpec(seconds=6, tempo=120, key="F# minor", seed=8)])[0].voices != alone.voices
    assert (alone.tonic, alone.mode, alone.key, alone.tempo, alone.seconds) == (6, "minor", "F# minor", 120.0, 6.0)


def test_pieces_cover_the_length_stay_in_range_and_avoid_parallels(gen: ChoraleGenerator) -> None:
    from genserve.models.music.evaluate import grid_from_piece, voice_metrics

    specs = [MusicSpec(seconds=8, tempo=150, key=k, seed=i)
             for i, k in enumerate(["C major", "A minor", "F# major", "Gb major", "E minor", "B major"])]
    pieces = gen.generate(specs)
    grids = [grid_from_piece(p, s.beats * 2) for s, p in zip(specs, pieces, strict=True)]
    assert voice_metrics(grids)["parallel 5ths/8ves"] == 0
    for spec, piece in zip(specs, pieces, strict=True):
        assert all(piece.voices), "every voice sings"
        for (lo, hi), notes in zip(VOICE_RANGES, piece.voices, strict=True):
            assert all(lo <= n.pitch <= hi for n in notes), (spec.key, notes)
            assert all(n.start + n.duration <= spec.beats + 1e-9 for n in notes)
        assert max(n.start + n.duration for v in piece.voices for n in v) > spec.beats - 2


def test_render_length_range_determinism(gen: ChoraleGenerator) -> None:
    piece = gen.generate([MusicSpec(seconds=3.3, tempo=90, key="Eb major", seed=3)])[0]
    for rate in (22050, 24000):
        audio = render(piece, rate)
        assert audio.dtype == np.float32 and audio.shape == (round(3.3 * rate),)
        assert np.abs(audio).max() <= 1.0 and 0.8 <= np.abs(audio).max() <= 0.9 + 1e-6
        assert np.abs(audio[-10:]).max() < 1e-2, "fades out"
        assert render(piece, rate).tobytes() == audio.tobytes()


def test_render_sixty_seconds_is_fast(gen: ChoraleGenerator) -> None:
    import time

    notes = tuple(tuple(pitch_range_walk(lo, hi)) for lo, hi in VOICE_RANGES)
    piece = Piece(notes, 240.0, 0, "major", "C major", 60.0)  # 240 beats of eighth notes: the worst case
    start = time.process_time()  # CPU time: a shared machine's wall clock says more about its neighbours
    render(piece, 24000)
    assert time.process_time() - start < 1.0  # typically 0.2-0.3 s


def pitch_range_walk(lo: int, hi: int):
    from genserve.models.music import Note

    return [Note(lo + (i % (hi - lo + 1)), i / 2, 0.5) for i in range(480)]


@pytest.mark.parametrize(("key", "tempo"), [("D major", 120), ("F# minor", 72), ("Bb major", 100), ("C minor", 60)])
def test_midi_round_trip_through_music21(gen: ChoraleGenerator, key: str, tempo: float) -> None:
    from music21 import converter
    from music21 import key as m21key
    from music21 import tempo as m21tempo

    piece = gen.generate([MusicSpec(seconds=4, tempo=tempo, key=key, seed=0)])[0]
    data = to_midi(piece)
    assert data[:4] == b"MThd" and data == to_midi(piece)
    score = converter.parseData(data, format="midi")
    marks = list(score.recurse().getElementsByClass(m21tempo.MetronomeMark))
    assert marks and marks[0].number == pytest.approx(tempo, abs=0.01)
    found = list(score.recurse().getElementsByClass(m21key.KeySignature))
    assert found
    k = found[0].asKey(found[0].mode) if not isinstance(found[0], m21key.Key) else found[0]
    tonic, mode = parse_key(key)
    assert (k.tonic.pitchClass, k.mode) == (tonic, mode)
    assert len(score.parts) == 4
    assert [n.pitch.midi for n in score.parts[0].flatten().notes][:3] == [n.pitch for n in piece.voices[0][:3]]


def test_key_signatures() -> None:
    assert key_signature("D major") == (2, 0) and key_signature("F# minor") == (3, 1)
    assert key_signature("Bb major") == (-2, 0) and key_signature("C minor") == (-3, 1)
    assert key_signature("G# major") == (-4, 0)  # eight sharps: written as Ab major


def test_serving_path_does_not_import_music21() -> None:
    code = ("import sys, torch; from genserve.models.music import load, MusicSpec, render, ChoraleGenerator; "
            "from genserve.models.music.midi import to_midi; "
            "from genserve.models.music.model import ChoraleTransformer, ChoraleConfig; "
            "g = ChoraleGenerator(ChoraleTransformer(ChoraleConfig(n_layer=1, n_head=2, d_model=32)), "
            "torch.device('cpu'), torch.float32); p = g.generate([MusicSpec(seconds=1)])[0]; render(p, 8000); "
            "to_midi(p); assert 'music21' not in sys.modules, 'music21 imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)


def toy_chorale() -> Chorale:
    """Two bars of D major after a one-beat pickup: S holds, A rests on beat 2, T/B move in quarters."""
    soprano = [(74, 0.0, 1.0), (76, 1.0, 4.0)]
    alto = [(69, 0.0, 1.0), (69, 1.0, 1.0), (66, 3.0, 2.0)]
    tenor = [(62, 0.0, 1.0), (61, 1.0, 1.0), (62, 2.0, 1.0), (64, 3.0, 1.0), (62, 4.0, 1.0)]
    bass = [(50, 0.0, 1.0), (45, 1.0, 1.0), (47, 2.0, 1.0), (49, 3.0, 1.0), (50, 4.0, 1.0)]
    return Chorale("toy", 2, "major", [-3.0, 1.0], 5.0, [soprano, alto, tenor, bass])


def test_encode_normalises_key_and_marks_metre() -> None:
    piece = toy_chorale()
    assert normalising_shift(2, "major") == -2 and normalising_shift(9, "minor") == 0
    tokens, positions = encode(piece)
    assert tokens.shape == (10, 4)
    assert positions.tolist() == [6, 7, 0, 1, 2, 3, 4, 5, 6, 7]  # a pickup on beat 4, then a full bar
    assert tokens[0].tolist() == [pitch_token(72), pitch_token(67), pitch_token(60), pitch_token(48)]
    assert tokens[1].tolist() == [HOLD] * 4
    assert tokens[4, 1] == REST and tokens[3:, 0].tolist() == [HOLD] * 7


def test_a_short_training_step_lowers_the_loss(tmp_path: Path) -> None:
    import random

    from genserve.models.common.training import adamw
    from genserve.models.music.train import random_batch, save_model, to_sequence

    torch.manual_seed(0)
    cfg = MusicTrainConfig(n_layer=1, n_head=2, d_model=32, context=32, batch_size=4, dropout=0.0)
    model = ChoraleTransformer(ChoraleConfig(n_layer=1, n_head=2, d_model=32, context=32, dropout=0.0))
    seqs = [to_sequence(*encode(toy_chorale()), "major")]
    assert seqs[0].tokens[:4].tolist() == [BOS] * 4
    batch = random_batch(seqs, cfg, random.Random(0))
    opt = adamw(model, 3e-3, 0.0)
    losses = []
    for _ in range(5):
        loss = batch_loss(model, *batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_model(model, tmp_path)
    loaded = load(tmp_path, torch.device("cpu"), torch.float32)
    assert (tmp_path / "model.safetensors").stat().st_size < 5e6
    assert loaded.generate([MusicSpec(seconds=2, seed=1)])[0].voices
