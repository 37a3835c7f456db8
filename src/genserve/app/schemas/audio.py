"""``POST /v1/audio/speech`` (OpenAI) and ``POST /v1/audio/music`` (genserve). Both answer with audio
bytes, not JSON."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel, PositiveTemperature, Seed
from genserve.app.serving.media import FORMATS

SPEECH_EXAMPLE: JsonDict = {"model": "genserve-speech", "input": "The quick brown fox jumped over the lazy dog.",
                            "voice": "alloy", "response_format": "wav"}
MUSIC_EXAMPLE: JsonDict = {"model": "genserve-music", "seconds": 20, "tempo": 90, "key": "D major", "seed": 7,
                           "response_format": "wav"}


class SpeechRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [SPEECH_EXAMPLE]})

    model: str
    input: str = Field(min_length=1, description="text to speak; at most the model's limits.max_input_chars "
                       "(4096 by default, as OpenAI)")
    voice: str = Field(description="OpenAI's voice names (alloy, ash, ballad, coral, echo, fable, nova, onyx, "
                       "sage, shimmer, verse, marin, cedar), or a voice of the model's own")
    instructions: str | None = Field(None, description="not supported by genserve's speech models: a request "
                                     "with instructions gets a 400 rather than having them ignored",
                                     json_schema_extra={"maxLength": 0})
    response_format: str = Field("mp3", description=f"one of {', '.join(FORMATS)}; all at 24 kHz mono "
                                 "(pcm: raw signed 16-bit little-endian samples)",
                                 json_schema_extra={"enum": list(FORMATS)})
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio"] = Field("audio", description="audio bytes, sent in chunks as they are "
                                            "produced (OpenAI's 'sse' is not supported)")
    seed: Seed | None = Field(None, description="neural models: the same seed gives the same "
                              "audio (espeak-ng has no randomness)")

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unsupported response_format {value!r}; supported: {', '.join(FORMATS)}")
        return value


class MusicRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MUSIC_EXAMPLE]})

    model: str
    seconds: float = Field(20.0, ge=1, le=60, description="length of the audio; MIDI covers the same beats")
    tempo: float = Field(90.0, ge=30, le=240, description="beats (quarter notes) per minute")
    key: str = Field("C major", description="tonic A–G with an optional # or b, then major or minor: "
                     "'D major', 'F# minor', 'Bb major'")
    temperature: float = PositiveTemperature
    seed: Seed | None = Field(None, description="the same seed and fields give the same audio (and MIDI "
                              "bytes); without one a seed is drawn and returned in the x-genserve-seed header")
    response_format: Literal["wav", "flac", "mp3", "mid"] = "wav"
