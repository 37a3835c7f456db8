"""``GET /v1/models``: OpenAI's model object plus what genserve knows about it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from genserve.app.schemas.base import OpenAIBaseModel


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genserve"
    modality: str
    tasks: list[str]
    ready: bool
    backend: str
    context_length: int | None = None
    sample_rate: int | None = Field(None, description="audio models: samples per second of the audio the model "
                                    "makes (speech is resampled to 24 kHz on the way out)")
    image_kind: Literal["diffusion", "latent"] | None = Field(
        None, description="image models: diffusion (steps, guidance, scheduler, streamed progress) or latent "
        "(a GAN, VAE or flow: class names and interpolation)")
    sizes: list[str] | None = Field(None, description="image models: the WIDTHxHEIGHT sizes served")
    native_size: str | None = Field(None, description="image models: the size 'auto' gives")
    class_names: list[str] | None = Field(None, description="class-conditional image models: what 'prompt' may "
                                          "name")
    can_inpaint: bool | None = Field(None, description="image models: whether edits take a mask")


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
