"""``transformers-tts``: text-to-speech models that transformers runs (VITS/MMS-TTS, Bark, MusicGen,
…), from a local directory or a hub id, for GPU nodes.

VITS models run batched: one padded forward pass for many texts, each cut to its own length
(``sequence_lengths``), speaking rate passed to the model. Other architectures run through
transformers' ``text-to-audio`` pipeline one text at a time, with speed left to the encoder.

Seeds: transformers' TTS models draw their noise for a whole batch from the global generator, so
a row's noise depends on its neighbours; a seeded text therefore runs alone, under its own seed,
and gives the same samples whatever else is queued. Unseeded texts share forward passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genserve.models.audio import SpeechSpec

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
                 "verse", "marin", "cedar")


class TransformersSpeech:
    streams = False  # audio comes per text segment, from the batcher

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        self.device, self.is_vits = device, config.model_type == "vits"
        if self.is_vits:
            from transformers import AutoTokenizer, VitsModel

            self.model = VitsModel.from_pretrained(path, dtype=dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.sample_rate = int(config.sampling_rate)
            self.num_speakers = int(config.num_speakers)
        else:
            from transformers import pipeline

            self.pipe = pipeline("text-to-audio", model=str(path), device=device, dtype=dtype)
            self.sample_rate = int(self.pipe.sampling_rate)
            self.num_speakers = 1
        self.voices = {name: f"speaker-{i % self.num_speakers}" for i, name in enumerate(OPENAI_VOICES)}
        self.default_voice = OPENAI_VOICES[0]

    def resolve_voice(self, voice: str) -> str:
        """OpenAI's voice names (spread over the model's speakers) or ``speaker-N``."""
        if voice in self.voices:
            return self.voices[voice]
        if voice.startswith("speaker-") and voice[8:].isdigit() and int(voice[8:]) < self.num_speakers:
            return voice
        raise ValueError(f"unknown voice {voice!r}; use one of {', '.join(self.voices)} or speaker-0 … "
                         f"speaker-{self.num_speakers - 1}")

    def residual_tempo(self, speed: float) -> float:
        return 1.0 if self.is_vits else speed

    @torch.inference_mode()
    def synthesize(self, specs: list[SpeechSpec]) -> list[np.ndarray]:
        """Audio for each spec at ``sample_rate``; specs of one call share voice and speed."""
        out: list[np.ndarray | None] = [None] * len(specs)
        unseeded = [i for i, s in enumerate(specs) if s.seed is None]
        if unseeded:
            for i, audio in zip(unseeded, self._run([specs[i] for i in unseeded]), strict=True):
                out[i] = audio
        for i, spec in enumerate(specs):
            if spec.seed is not None:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(spec.seed)
                    out[i] = self._run([spec])[0]
        return out  # type: ignore[return-value]

    def _run(self, specs: list[SpeechSpec]) -> list[np.ndarray]:
        if not self.is_vits:
            return [np.asarray(self.pipe(s.text)["audio"], dtype=np.float32).reshape(-1) for s in specs]
        batch = self.tokenizer([s.text for s in specs], return_tensors="pt", padding=True).to(self.device)
        speaker = int(specs[0].voice.removeprefix("speaker-")) if self.num_speakers > 1 else None
        result = self.model(**batch, speaker_id=speaker, speaking_rate=specs[0].speed)
        wave = result.waveform.float().cpu().numpy()  # (batch, samples), padded
        return [wave[i, : int(n)].copy() for i, n in enumerate(result.sequence_lengths)]


def load(path: Path, device: torch.device, dtype: torch.dtype) -> TransformersSpeech:
    return TransformersSpeech(path, device, dtype)
