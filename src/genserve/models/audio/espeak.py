"""``espeak-ng``: formant text-to-speech from the Debian package of that name, as a model family.

The model directory holds only ``config.json``: the speaking rate at ``speed`` 1.0 and OpenAI's
voice names mapped to espeak-ng voices (``en-us+klatt``: language + variant). Any voice espeak-ng
lists is accepted by its own name too. espeak-ng writes a WAV stream to stdout as it speaks, so the
backend reads and sends audio while the rest of the text is still being spoken. Output is fully
deterministic: there is no randomness to seed.

Speed: espeak-ng's rate spans 80–1000 words per minute; what lies outside is left to the encoder's
tempo filter (``residual_tempo``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import torch

from genserve.models.audio import SpeechSpec

MIN_WPM, MAX_WPM = 80, 1000
_VOICE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{1,8})*(\+[A-Za-z0-9_]{1,24})?$")


def read_wav_header(data: bytes) -> tuple[int, int] | None:
    """(sample rate, offset of the samples) of a 16-bit mono RIFF header, or None while ``data`` is
    too short to hold it. espeak-ng streams, so the sizes in its header are placeholders."""
    if len(data) < 12:
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV stream")
    pos, rate = 12, None
    while len(data) >= pos + 8:
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if tag == b"data":
            if rate is None:
                raise RuntimeError("espeak-ng's WAV stream has no fmt chunk")
            return rate, pos + 8
        if tag == b"fmt ":
            if len(data) < pos + 24:
                return None
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
            if channels != 1 or bits != 16:
                raise RuntimeError(f"unexpected espeak-ng output: {channels} channels, {bits} bits")
        pos += 8 + size
    return None


def pcm16_to_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


class EspeakSpeech:
    streams = True  # the backend reads audio while the process is still speaking

    def __init__(self, config: dict, executable: str) -> None:
        self.executable = executable
        self.words_per_minute = float(config.get("words_per_minute", 175))
        self.voices: dict[str, str] = dict(config["voices"])
        self.default_voice = config.get("default_voice", next(iter(self.voices)))
        self.installed = _listed(executable, "")
        self.variants = _listed(executable, "variant", column=4)
        self.sample_rate = self._probe_rate()

    def resolve_voice(self, voice: str) -> str:
        """OpenAI's voice names, or any espeak-ng voice (``en-gb``, ``de+f3``)."""
        if voice in self.voices:
            return self.voices[voice]
        language, _, variant = voice.partition("+")
        if _VOICE.match(voice) and language in self.installed and (not variant or variant in self.variants):
            return voice
        raise ValueError(f"unknown voice {voice!r}; use one of {', '.join(self.voices)} or an espeak-ng "
                         "voice such as 'en-gb' or 'en-us+f3' (language, then an optional +variant)")

    def words_per_minute_for(self, speed: float) -> int:
        return round(min(max(self.words_per_minute * speed, MIN_WPM), MAX_WPM))

    def residual_tempo(self, speed: float) -> float:
        """The tempo change that espeak-ng's rate range leaves to the encoder (1.0 within it)."""
        return self.words_per_minute * speed / self.words_per_minute_for(speed)

    def argv(self, spec: SpeechSpec) -> list[str]:
        """The command that speaks ``spec.text`` (given on stdin, never as an argument) to stdout."""
        return [self.executable, "-v", spec.voice, "-s", str(self.words_per_minute_for(spec.speed)), "--stdout"]

    def synthesize(self, spec: SpeechSpec) -> np.ndarray:
        """The whole utterance at ``sample_rate`` (the residual tempo not applied)."""
        out = subprocess.run(self.argv(spec), input=spec.text.encode(), capture_output=True, check=True,
                             timeout=600).stdout
        header = read_wav_header(out)
        if header is None:
            raise RuntimeError("espeak-ng wrote no audio")
        return pcm16_to_float(out[header[1]:])

    def _probe_rate(self) -> int:
        spec = SpeechSpec("a", self.voices[self.default_voice])
        out = subprocess.run(self.argv(spec), input=b"a", capture_output=True, check=True, timeout=60).stdout
        header = read_wav_header(out)
        if header is None:
            raise RuntimeError("espeak-ng wrote no audio")
        return header[0]


def _listed(executable: str, kind: str, column: int = 1) -> set[str]:
    """Languages (``--voices``) or variant file names (``--voices=variant``) espeak-ng has."""
    listing = subprocess.run([executable, f"--voices={kind}" if kind else "--voices"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    rows = [line.split() for line in listing.splitlines()[1:]]
    return {row[column].removeprefix("!v/") for row in rows if len(row) > column}


def load(path: Path, device: torch.device, dtype: torch.dtype) -> EspeakSpeech:
    """``device`` and ``dtype`` do not apply: espeak-ng runs on the CPU in its own process."""
    config = json.loads((path / "config.json").read_text())
    executable = shutil.which(config.get("executable", "espeak-ng"))
    if executable is None:
        raise FileNotFoundError("espeak-ng is not installed: `apt-get install espeak-ng` (Debian/Ubuntu); "
                                "the Dockerfile and `make install` do this")
    return EspeakSpeech(config, executable)


def make_tiny(path: Path) -> None:
    """A one-voice configuration in ``path`` (the contract test's instance; espeak-ng has no weights)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"family": "espeak-ng", "words_per_minute": 160, "default_voice": "alloy", "voices": {"alloy": "en-us"}}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
