"""``/v1/audio/*``: speech (OpenAI) and music (genserve)."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from genserve.app.deps import AudioServingDep
from genserve.app.routers.responses import BINARY, ERRORS
from genserve.app.schemas.audio import MusicRequest, SpeechRequest

router = APIRouter(prefix="/v1/audio", tags=["audio"], responses=ERRORS)

AUDIO: dict[str, Any] = {
    "description": "Audio bytes in the requested format",
    "content": {t: BINARY for t in ("audio/mpeg", "audio/ogg", "audio/aac", "audio/flac", "audio/wav", "audio/pcm")}}
MUSIC: dict[str, Any] = {
    "description": "Audio (WAV, FLAC) or a MIDI file; the seed used is in the x-genserve-seed header",
    "content": {t: BINARY for t in ("audio/wav", "audio/flac", "audio/mpeg", "audio/midi")}}


@router.post("/speech", response_class=Response, responses={200: AUDIO})
async def create_speech(body: SpeechRequest, request: Request, audio: AudioServingDep) -> Response:
    """Speaks `input` (OpenAI's speech API). The audio is sent in chunks as it is produced (FLAC whole,
    once its header can hold the length); every format is 24 kHz mono."""
    return await audio.speech(body, request)


@router.post("/music", response_class=Response, responses={200: MUSIC})
async def create_music(body: MusicRequest, request: Request, audio: AudioServingDep) -> Response:
    """Composes `seconds` of four-voice chorale in `key` at `tempo`, rendered to WAV or FLAC by
    genserve's synthesiser, or as MIDI. The same seed and fields give the same bytes."""
    return await audio.music(body, request)
