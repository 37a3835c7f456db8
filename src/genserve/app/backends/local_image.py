"""In-process image models behind one ``DynamicBatcher`` each.

A request becomes one ``ImageJob`` per image; jobs that can share a forward pass (same size, steps,
scheduler, guidance, kind and strength) are batched by the batcher's key. The runner that adapts the
model to jobs (``DiffusionRunner`` for diffusers pipelines, ``LatentRunner`` for genserve's GAN, VAE
and flow) is chosen in ``models.image.runner``; this module wires it to the batcher and the metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

import numpy as np

from genserve.app.backends.base import ImageArtifact, ImageEvent, ModelFacts, Progress
from genserve.app.backends.batching import BatchedBackend
from genserve.app.errors import InvalidRequestError
from genserve.models.diffusion.runner import DiffusionRunner
from genserve.models.image.runner import LatentRunner, runner_for
from genserve.models.params import ImageInterpolationParams, ImageJob, ImageParams


class LocalImageBackend(BatchedBackend):
    runner: DiffusionRunner | LatentRunner | None = None

    def check_room(self, task: str) -> None:
        if task != "interpolation":  # interpolations run beside the batcher, never in its queue
            super().check_room(task)

    def setup(self) -> None:
        e = self.entry
        self.runner = runner_for(self.load_model(), 2 * e.max_batch_size, e.attention, e.compile)
        self.loaded = True

    async def start(self) -> None:
        runner = self.runner
        assert runner is not None
        # A diffusers model whose rows stayed batch-variant (see the load log) runs one image at a time.
        self.start_batcher(self._timed(runner.run), key=ImageJob.key, max_batch_size=None if runner.invariant else 1)

    def _timed(self, run: Callable[..., list[np.ndarray]]) -> Callable[[list[ImageJob]], list[np.ndarray]]:
        """``run`` reporting each denoising step: its latency to the metrics (their count is the step
        counter), its progress to the batcher (a long batch that steps is not stalled), and stopping
        at the next step once every caller of the batch has gone."""
        hist, mid = self.metrics.denoising_step_seconds, self.entry.id

        def timed(jobs: list[ImageJob]) -> list[np.ndarray]:
            last = time.perf_counter()

            def tick(_step: int, _total: int) -> None:
                nonlocal last
                now = time.perf_counter()
                hist.labels(mid).observe(now - last)
                last = now
                self.stepped(f"{len(jobs)} image(s)")

            return run(jobs, tick)

        return timed

    def describe(self) -> ModelFacts:
        r = self.runner
        if r is None:
            return ModelFacts()
        return ModelFacts(sizes=list(r.sizes), native_size=r.native, image_kind="latent" if r.kind == "latent"
                          else "diffusion", class_names=list(r.class_names) or None, can_inpaint=r.can_edit,
                          can_vary=r.can_vary, edit_at_native_size=r.pixel_space)

    def _class_index(self, name: str, param: str) -> int | None:
        runner = self.runner
        if not isinstance(runner, LatentRunner):
            return None
        try:
            return runner.class_index(name)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param=param) from None

    async def generate(self, params: ImageParams) -> AsyncGenerator[ImageEvent, None]:
        """``Progress`` of the batch's denoising steps when ``params.stream`` (the batch's steps are
        every image's steps), then one ``ImageArtifact`` per job, in order."""
        batcher = self.batcher
        assert batcher is not None
        jobs = params.jobs
        for job in jobs:
            job.class_index = self._class_index(job.prompt, "prompt")
        steps: asyncio.Queue[Progress] = asyncio.Queue()
        if params.stream:
            loop = asyncio.get_running_loop()

            def on_step(step: int, total: int) -> None:  # in the batcher's thread
                loop.call_soon_threadsafe(steps.put_nowait, Progress(step, total))

            jobs[0].on_step = on_step
        work = asyncio.ensure_future(batcher.submit_many(jobs))
        try:
            while not work.done() or not steps.empty():
                getter = asyncio.ensure_future(steps.get())
                try:
                    await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()  # no-op once it has its step
                if getter.done():
                    yield getter.result()
            for job, pixels in zip(jobs, work.result(), strict=True):
                yield ImageArtifact(pixels=pixels, seed=job.seed)
        finally:
            work.cancel()

    async def interpolate(self, params: ImageInterpolationParams) -> AsyncGenerator[ImageArtifact, None]:
        """The frames at the size asked for (the serving layer checked it is one of the model's sizes),
        else the model's native size: one artifact per frame, or one with all ``frames`` for a GIF."""
        runner = self.runner
        if not isinstance(runner, LatentRunner):
            raise InvalidRequestError("Interpolation needs a GAN, VAE or flow model.", param="model")
        class_index = self._class_index(params.class_name, "class") if params.class_name is not None else None
        width, height = (params.width, params.height) if params.width and params.height else runner.native
        frames = await asyncio.to_thread(runner.interpolate, params.seed_start, params.seed_end, params.frames,
                                         params.method, class_index, width, height)
        if params.format == "gif":
            yield ImageArtifact(frames=frames, media_type="image/gif")
            return
        for frame in frames:
            yield ImageArtifact(pixels=frame)
