"""``/v1/images/*``: generations and edits (OpenAI), interpolations (genserve), and the files that
``response_format: url`` points at."""

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from genserve.app.deps import ImageServingDep
from genserve.app.routers.responses import BINARY, ERRORS
from genserve.app.schemas.base import ErrorResponse
from genserve.app.schemas.images import ImageEditForm, ImageGenerationRequest, ImageInterpolationRequest, ImagesResponse
from genserve.app.serving.images import FILES_PATH

router = APIRouter(prefix="/v1/images", tags=["images"], responses=ERRORS)
files_router = APIRouter(tags=["images"])


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True, responses={
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or with `stream: true` server-sent events: "
          "progress per denoising step, then image_generation.completed per image"}})
async def create_image(body: ImageGenerationRequest, request: Request,
                       images: ImageServingDep) -> ImagesResponse | Response:
    """Makes `n` images (OpenAI's images API). Diffusion models take `prompt` as text; class-conditional
    GAN, VAE and flow models take one of their class names. With `stream: true`, server-sent events
    report each denoising step, then the images."""
    return await images.generate(body, request)


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edit_image(request: Request, form: Annotated[ImageEditForm, Form()],
                     image: Annotated[UploadFile, File(description="PNG to edit")],
                     images: ImageServingDep,
                     mask: Annotated[UploadFile | None, File(description="PNG whose transparent pixels mark what "
                                                             "to repaint (default: the image's alpha)")] = None,
                     ) -> ImagesResponse | Response:
    """OpenAI's multipart images edit. Inpainting: the transparent part of `mask` (or, without a
    mask, of the image's own alpha) is repainted to fit `prompt` and every other pixel comes back
    as sent. Image-to-image: an image without transparent pixels and no mask is redrawn as a whole
    toward `prompt`, `strength` (default 0.75) saying how much of it to redo."""
    return await images.edit(form, image, mask, request)


@router.post("/interpolations", response_model=ImagesResponse, response_model_exclude_none=True)
async def interpolate_images(body: ImageInterpolationRequest, request: Request,
                             images: ImageServingDep) -> ImagesResponse | Response:
    """Frames along the straight (`lerp`) or spherical (`slerp`) path between the latents that
    `seed_start` and `seed_end` draw, in a GAN, VAE or flow model: one PNG per frame, or a GIF."""
    return await images.interpolate(body, request)


@files_router.get(FILES_PATH + "/{file_id}", response_class=Response, responses={
    200: {"description": "The image, in the request's output_format",
          "content": {f"image/{f}": BINARY for f in ("png", "jpeg", "webp")}},
    404: {"model": ErrorResponse, "description": "No such image, or it has expired"}})
async def image_file(file_id: str, images: ImageServingDep) -> Response:
    """An image made with `response_format: url`, until it expires. The id is the credential, as
    with OpenAI's signed URLs: no API key needed, so browsers and `<img>` tags can load it."""
    return images.file(file_id)
