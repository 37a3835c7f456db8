"""``POST /v1/images/generations`` and ``/v1/images/edits`` (OpenAI, plus the diffusers knobs
``seed``, ``num_inference_steps``, ``guidance_scale``, ``scheduler``, ``negative_prompt``) and
``POST /v1/images/interpolations`` (genserve: latent walks of GAN, VAE and flow models)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel, Seed, only_when_streaming
from genserve.app.schemas.provenance import Provenance

GENERATION_EXAMPLE: JsonDict = {"model": "genserve-diffusion", "prompt": "red apple", "n": 2, "size": "32x32",
                                "response_format": "b64_json", "seed": 7}
INTERPOLATION_EXAMPLE: JsonDict = {"model": "genserve-gan", "seed_start": 1, "seed_end": 2, "frames": 8,
                                   "method": "slerp", "format": "gif", "class": "7"}
Scheduler = Literal["ddpm", "ddim", "dpm++", "euler", "euler_a"]
IMAGE_TO_IMAGE_STRENGTH = 0.75  # an edit without a mask redoes this much of the image unless told otherwise
ResponseFormat = Literal["b64_json", "url"]
OutputFormat = Literal["png", "jpeg", "webp"]


class DiffusionKnobs(BaseModel):
    """The fields that a diffusion model reads and other image models refuse (400) when set."""

    seed: Seed | None = Field(None, description="image k of the request uses seed + k: the same "
                              "seed and fields give the same pixels, alone or batched; drawn at random if unset")
    num_inference_steps: int | None = Field(None, ge=1, description="denoising steps (default: the model's)")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="classifier-free guidance; 1 turns it off")
    scheduler: Scheduler | None = Field(None, description="sampler: ddpm, ddim, dpm++ (DPM-Solver++), euler, "
                                        "euler_a (default: the model's)")
    negative_prompt: str | None = Field(None, max_length=4000)


class OutputFields(BaseModel):
    """The encoding of the images a generation or an edit returns."""

    output_format: OutputFormat = Field("png", description="the images' format (OpenAI's gpt-image field); "
                                        "this server's own models only")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg and webp: quality from 0 to "
                                           "100 (default 100)")


class ImageGenerationRequest(OpenAIBaseModel, DiffusionKnobs, OutputFields):
    model_config = ConfigDict(json_schema_extra={"examples": [GENERATION_EXAMPLE]})

    model: str
    prompt: str = Field(min_length=1, max_length=4000, description="text for a diffusion model; for a "
                        "class-conditional GAN, VAE or flow, one of its class names (or 'random')")
    n: int = Field(1, ge=1, description="images (at most the model's limits.max_n)")
    size: str | None = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$", description="WIDTHxHEIGHT, one the model "
                             "supports (a 400 lists them); default: the model's own")
    response_format: ResponseFormat = Field("b64_json", description="b64_json: the image's bytes in base64; "
                                            "url: a link to it on this server, valid for image_url_ttl_s")
    quality: str | None = Field(None, description="accepted for compatibility; does not change the output")
    style: str | None = Field(None, description="accepted for compatibility; does not change the output")
    user: str | None = None
    stream: bool = Field(False, description="diffusion models: server-sent events, as OpenAI's: "
                         "image_generation.completed for each image (b64_json, and url when response_format is "
                         "url); with stream_progress, genserve's image_generation.progress before them")
    stream_progress: Annotated[bool, AfterValidator(only_when_streaming)] = Field(
        False, description="genserve's own, only with stream: an image_generation.progress event (step, "
        "total_steps) for each denoising step. Off by default: OpenAI's streams have no such event, and a "
        "client that validates events strictly (the OpenAI SDK's strict mode) refuses one")
    # OpenAI takes 0-3; the document says 0, and 1-3 get a 400 that says why.
    partial_images: int | None = Field(None, ge=0, le=3, json_schema_extra={"maximum": 0},
                                       description="OpenAI's partial images while streaming: "
                                       "not sent: genserve checks and marks each finished image before it "
                                       "leaves (0 or unset; stream_progress says how far the denoising is)")


class ImageEditForm(DiffusionKnobs, OutputFields):
    """OpenAI's multipart form (``image``, ``mask`` come as files beside these fields). Form values
    arrive as text, so numbers are parsed here, not taken strictly."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$")
    response_format: ResponseFormat = "b64_json"
    user: str | None = None
    strength: float | None = Field(None, gt=0, le=1, description="how much of the image to redo, from the "
                                   f"noise level it is started at: image-to-image (default {IMAGE_TO_IMAGE_STRENGTH}"
                                   "), or inpainting (default: the pipeline's, 1 for most)")


class ImageInterpolationRequest(OpenAIBaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [INTERPOLATION_EXAMPLE]}, populate_by_name=True)

    model: str
    seed_start: Seed = Field(description="the walk starts at the latent this seed draws")
    seed_end: Seed
    frames: int = Field(8, ge=2, le=64)
    method: Literal["lerp", "slerp"] = Field("slerp", description="straight line, or the great circle that "
                                             "keeps Gaussian latents at a typical norm")
    format: Literal["png", "gif"] = Field("png", description="png: one image per frame; gif: one animated GIF")
    size: str | None = Field(None, pattern=r"^(auto|\d{1,5}x\d{1,5})$", description="WIDTHxHEIGHT of every "
                             "frame, one the model lists in /v1/models (default: its native size)")
    class_: str | None = Field(None, alias="class", description="class-conditional models: one of the class "
                               "names (default: each end's own class, drawn from its seed)")
    response_format: ResponseFormat = "b64_json"


class ImageData(OpenAIBaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(None, description="genserve: the seed this image was drawn with")


class ImagesResponse(OpenAIBaseModel):
    created: int
    data: list[ImageData]
    provenance: Provenance | None = Field(None, description="genserve's extension: what marks the images "
                                          "carry (docs/provenance.md)")
