"""``genserve eval music``: generated chorales against held-out Bach chorales, and the model card.

Samples: 100 pieces of 16 bars at temperature 1, half in C major and half in A minor (seeds 0..99
from ``--seed``), twice: "network" with the serving-time rules off (range clamp, parallel guard),
so that the metrics measure the network alone, and "served" with them on, as the API samples.
Everything is compared in the normalised key on the eighth-note grid. Further columns: the ``test``
split's real chorales (the reference: what Bach scores); a baseline of uniform random notes, each
voice starting a new pitch drawn uniformly in its range on half of the grid steps.

Metrics:
- pitch-class JS: Jensen–Shannon divergence (bits, 0..1) between the note-onset pitch-class
  histogram of the column and that of the ``train`` chorales, per mode, averaged over the modes;
- in range: share of notes inside their voice's :data:`VOICE_RANGES` (S C4-G5, A G3-D5, T C3-G4,
  B E2-C4), all voices;
- parallel 5ths/8ves: among transitions where both voices of a pair move to a new note at the same
  grid step (all six pairs), the share that move in parallel perfect fifths or octaves/unisons
  (compound intervals included);
- voice crossing: among grid steps where two adjacent voices both sound, the share with the lower
  voice above the upper one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from genserve.models.common.loading import weights_dir
from genserve.models.music.data import encode, load_chorales
from genserve.models.music.generator import VOICE_RANGES, ChoraleGenerator, MusicSpec, Piece, load
from genserve.models.music.model import HOLD, STEPS_PER_BAR, STEPS_PER_BEAT, token_pitch

log = logging.getLogger(__name__)

COLUMNS = ("network", "served", "held-out Bach", "random baseline")
METRICS = ("pitch-class JS", "in range", "parallel 5ths/8ves", "voice crossing")
SAMPLES, BARS, TEMPO = 100, 16, 120.0


def grid_from_tokens(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps, 4) tokens -> sounding pitch per step and voice (-1: silent), and note-onset flags."""
    pitch = np.full(tokens.shape, -1)
    onset = tokens >= 4
    for v in range(4):
        current = -1
        for i, t in enumerate(tokens[:, v]):
            current = token_pitch(int(t)) if t >= 4 else current if t == HOLD else -1
            pitch[i, v] = current
    return pitch, onset


def grid_from_piece(piece: Piece, steps: int) -> tuple[np.ndarray, np.ndarray]:
    pitch, onset = np.full((steps, 4), -1), np.zeros((steps, 4), dtype=bool)
    for v, notes in enumerate(piece.voices):
        for n in notes:
            a = round(n.start * STEPS_PER_BEAT)
            pitch[a:a + round(n.duration * STEPS_PER_BEAT), v] = n.pitch
            onset[a, v] = True
    return pitch, onset


def random_grid(steps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    onset = rng.random((steps, 4)) < 0.5
    onset[0] = True
    pitch = np.zeros((steps, 4), dtype=np.int64)
    for v, (lo, hi) in enumerate(VOICE_RANGES):
        new = rng.integers(lo, hi + 1, steps)
        idx = np.maximum.accumulate(np.where(onset[:, v], np.arange(steps), 0))
        pitch[:, v] = new[idx]
    return pitch, onset


def pc_histogram(grids) -> np.ndarray:
    counts = np.zeros(12)
    for pitch, onset in grids:
        np.add.at(counts, pitch[onset] % 12, 1)
    return counts / counts.sum()


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        keep = a > 0
        return float((a[keep] * np.log2(a[keep] / b[keep])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def voice_metrics(grids) -> dict[str, float]:
    """In-range share, parallel perfect intervals and crossings over a list of (pitch, onset) grids."""
    inside = notes = parallels = moves = crossings = pairs = 0
    for pitch, onset in grids:
        for v, (lo, hi) in enumerate(VOICE_RANGES):
            p = pitch[onset[:, v], v]
            inside += int(((p >= lo) & (p <= hi)).sum())
            notes += len(p)
        for a in range(4):
            for b in range(a + 1, 4):
                both = (pitch[:, a] >= 0) & (pitch[:, b] >= 0)
                move = onset[1:, a] & onset[1:, b] & both[1:] & both[:-1]
                move &= (pitch[1:, a] != pitch[:-1, a]) & (pitch[1:, b] != pitch[:-1, b])
                before = (pitch[:-1, a] - pitch[:-1, b]) % 12
                after = (pitch[1:, a] - pitch[1:, b]) % 12
                perfect = (before == after) & ((after == 0) | (after == 7))
                parallels += int((move & perfect).sum())
                moves += int(move.sum())
                if b == a + 1:
                    crossings += int((both & (pitch[:, a] < pitch[:, b])).sum())
                    pairs += int(both.sum())
    return {"in range": inside / notes, "parallel 5ths/8ves": parallels / max(moves, 1),
            "voice crossing": crossings / max(pairs, 1)}


def column_metrics(by_mode: dict[str, list], reference: dict[str, np.ndarray]) -> dict[str, float]:
    js = np.mean([js_divergence(pc_histogram(g), reference[mode]) for mode, g in by_mode.items()])
    return {"pitch-class JS": float(js), **voice_metrics([g for grids in by_mode.values() for g in grids])}


def real_grids(split: str) -> dict[str, list]:
    out: dict[str, list] = {"major": [], "minor": []}
    for p in load_chorales(split):
        out[p.mode].append(grid_from_tokens(encode(p)[0]))
    return out


def generated_grids(gen: ChoraleGenerator, specs: list[MusicSpec], steps: int) -> tuple[dict[str, list], list[Piece]]:
    pieces = [p for i in range(0, len(specs), 50) for p in gen.generate(specs[i:i + 50])]
    grids: dict[str, list] = {"major": [], "minor": []}
    for p in pieces:
        grids[p.mode].append(grid_from_piece(p, steps))
    return grids, pieces


def eval_music(model_dir: Path, out: Path, seed: int = 0, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    gen = load(model_dir, torch.device("cpu"), torch.float32)
    beats = BARS * STEPS_PER_BAR // STEPS_PER_BEAT
    steps = beats * STEPS_PER_BEAT
    specs = [MusicSpec(seconds=beats * 60 / TEMPO, tempo=TEMPO, key="C major" if i % 2 == 0 else "A minor",
                       seed=seed + i) for i in range(SAMPLES)]
    start = time.perf_counter()
    served, pieces = generated_grids(gen, specs, steps)
    seconds = time.perf_counter() - start
    log.info("generated %d pieces of %d bars in %.0f s", SAMPLES, BARS, seconds)
    gen.clamp_ranges = gen.avoid_parallels = False
    network, _ = generated_grids(gen, specs, steps)
    train = real_grids("train")
    reference = {mode: pc_histogram(g) for mode, g in train.items()}
    rng = np.random.default_rng(seed)
    baseline = {mode: [random_grid(steps, rng) for _ in range(SAMPLES // 2)] for mode in ("major", "minor")}
    metrics = {"network": column_metrics(network, reference), "served": column_metrics(served, reference),
               "held-out Bach": column_metrics(real_grids("test"), reference),
               "random baseline": column_metrics(baseline, reference)}
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "piano_roll.png"
    plot_piano_roll(pieces[0], plot)
    report = {"model": model_dir.name, "samples": SAMPLES, "bars": BARS, "seed": seed, "temperature": 1.0,
              "sampling_seconds": seconds, "metrics": metrics, "voice_ranges": VOICE_RANGES, "plot": plot.name}
    (out / "music_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def plot_piano_roll(piece: Piece, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    colors = ("tab:red", "tab:orange", "tab:green", "tab:blue")
    for v, notes in enumerate(piece.voices):
        for n in notes:
            ax.broken_barh([(n.start, n.duration * 0.95)], (n.pitch - 0.4, 0.8), color=colors[v])
    names = ("soprano", "alto", "tenor", "bass")
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colors, names, strict=True)], loc="upper right", ncol=4)
    for bar in range(0, int(piece.seconds * piece.tempo / 60) + 1, 4):
        ax.axvline(bar, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("beats (quarter notes); grey lines are bar lines")
    ax.set_ylabel("MIDI pitch")
    ax.set_title(f"genserve-music: a generated chorale in {piece.key}, as served (temperature 1)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = ["| metric | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(f"{metrics[c][m]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_card(model_dir: Path, report: dict) -> None:
    """(Re)writes the model card from ``training_report.json`` and an ``eval_music`` report whose files
    are in ``model_dir / "eval"``."""
    train = json.loads((model_dir / "training_report.json").read_text())
    cfg, last_seed = train["config"], report["seed"] + report["samples"] - 1
    m = report["metrics"]
    parallels = m["network"]["parallel 5ths/8ves"] / max(m["held-out Bach"]["parallel 5ths/8ves"], 1e-9)
    card = f"""# genserve-music

A {train['parameters'] / 1e6:.2f}M-parameter decoder-only transformer (family `chorale`) that writes
four-part chorales in the style of J. S. Bach: {cfg['n_layer']} layers, width {cfg['d_model']},
{cfg['n_head']} heads, rotary positions, context {cfg['context']} tokens (8 bars). The embedded music
model of genserve, served by `POST /v1/audio/music`: the server samples a piece, renders it with a
small additive organ synthesiser (`models/music/synth.py`) or writes it as MIDI (`models/music/midi.py`).

## Data
The Bach chorales that `music21` ships (`corpus.getComposer('bach')`): the {train['train_chorales'] +
train['valid_chorales'] + train['test_chorales']} scores with exactly four parts (S, A, T, B) in 4/4,
split by a hash of the file name into {train['train_chorales']} train, {train['valid_chorales']} valid
and {train['test_chorales']} test chorales ({train['train_tokens']:,} training tokens). The same tune
harmonised in two cantatas counts as two pieces, so a test chorale can share its melody with a
training one.

## Representation
Each chorale is moved to C major or A minor (the key music21's analysis finds, by the smaller shift)
and sampled on an eighth-note grid (a pair of sixteenths keeps its second note). Each grid step is four
tokens, soprano, alto, tenor, bass, each a MIDI pitch (a note starts), `HOLD` or `REST`; a piece is
a `BOS` step and its steps. Every token carries two added embeddings: the mode (major/minor: the
conditioning) and the slot it predicts (voice and eighth of the bar), so the model knows the metre.
At serving time a piece starts on a downbeat, is sampled with a sliding 256-token KV cache for as
many beats as `seconds` at `tempo` need, moves to the requested tonic by the smaller shift
(-6..+5 semitones), and each voice samples only pitches that land in its range there
(S C4-G5, A G3-D5, T C3-G4, B E2-C4) and that make no parallel fifths or octaves with a voice above
(voices are drawn top-down in each step, so the guard knows where the upper voices went).

## Training
`genserve train music --minutes {cfg['minutes']:g} --threads {cfg['threads']}` ({train['machine']}):
AdamW (peak learning rate {cfg['lr']}, warm-up then cosine decay over the budget), batches of
{cfg['batch_size']} random windows of {cfg['context']} tokens, dropout {cfg['dropout']}. {train['steps']:,} steps,
{train['epochs']:.0f} epochs, {train['minutes']:.0f} minutes; the checkpoint with the best valid NLL (step
{train['best_step']:,}) is saved in float16. Held-out (test split) NLL of the shipped weights:
**{train['heldout_nll_per_token']:.3f} nats per token** ({train['heldout_nll_per_step']:.2f} per eighth-note
step of four voices); valid split {train['valid_nll_per_token']:.3f}.

## Evaluation
`genserve eval music`: {report['samples']} generated pieces of {report['bars']} bars (temperature
{report['temperature']:g}, half C major, half A minor, seeds {report['seed']}..{last_seed}),
sampled twice: *network* with the serving-time rules off (range clamp, parallel guard), so that the
numbers measure the network alone, and *served* with them on, as the API samples (in range and free
of parallels by construction). The {train['test_chorales']} test chorales are the reference, uniform
random notes within the voice ranges a baseline (in range by construction). Pitch-class JS is the
Jensen-Shannon divergence (bits) between note pitch-class histograms and the training chorales', per
mode; parallel 5ths/8ves is the share of transitions where both voices of a pair move that move in
parallel perfect fifths or octaves/unisons (all six pairs); voice crossing is the share of steps
where a voice sounds below the next lower one (adjacent pairs). Ranges: S C4-G5, A G3-D5, T C3-G4,
B E2-C4; the real chorales, moved to C major / A minor, leave them slightly.

{format_table(report['metrics'])}

A served piece (C major, seed {report['seed']}, 16 bars):

![piano roll of a generated chorale]({'eval/' + report['plot']})

## Limits
- Eighth-note grid and 4/4 only; no fermatas, so phrases have no marked ends, and a piece is cut
  at the requested length (with a fade-out), not brought to a final cadence.
- {train['train_chorales']} training chorales are a small corpus and the network saw them for
  {train['epochs']:.0f} epochs on one CPU thread: it has the idiom's surface (key, ranges, spacing,
  rhythm) but on its own writes parallel fifths and octaves about {parallels:.0f}x as often as Bach;
  the serving-time guard removes them. The valid NLL had flattened by the end of the budget, so more
  data would likely help more than more epochs.
- The synthesiser is a plain additive organ, not a choir.
"""
    (model_dir / "README.md").write_text(card)


def evaluate(model: str | None = None, out: str | None = None, seed: int = 0, threads: int | None = None) -> str:
    """``genserve eval music``: ``model`` (default: the shipped genserve-music) measured into ``out``
    (default MODEL/eval); the card of a trained directory gets the numbers of its own eval."""
    path = Path(model) if model else weights_dir() / "genserve-music"
    report = eval_music(path, Path(out) if out else path / "eval", seed, threads or 1)
    if out is None and (path / "training_report.json").is_file():
        write_card(path, report)
    return format_table(report["metrics"])
