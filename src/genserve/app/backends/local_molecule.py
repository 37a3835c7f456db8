"""Local molecule models.

``LocalMoleculeBackend`` samples a SELFIES decoder (family ``selfies-llama``) on the text engine:
a round of ``count`` molecules is one engine request with ``n = count`` sequences, each started
from the beginning-of-molecule token with its own seed, so rounds share engine steps with each
other and with every other request. ``LocalMolVAEBackend`` runs the molecular VAE's latent
interpolation (family ``mol-vae``) through a dynamic batcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from genserve.app.backends.base import Backend, TextRequest, Usage
from genserve.app.backends.batching import BatchedBackend
from genserve.app.backends.local_text import LocalTextBackend
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry
from genserve.models.common.loading import local_dir
from genserve.models.errors import InputError
from genserve.models.molecule.generator import TrainingSet
from genserve.models.text.sampling import SamplingParams


class LocalMoleculeBackend(Backend):
    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.text = LocalTextBackend(entry, metrics)  # the engine process, its limits and metrics
        self.training_set: TrainingSet | None = None
        self.bos_id = 0

    def setup(self) -> None:
        self.text.setup()
        tm = self.text.tm
        if tm is None or tm.tokenizer.bos_token_id is None:
            raise ValueError(f"{self.entry.source}: a SELFIES generator's tokenizer needs a bos_token to sample from")
        self.bos_id = tm.tokenizer.bos_token_id
        self.training_set = TrainingSet.load(local_dir(self.entry.resolved_source or self.entry.source or ""))
        self.loaded = True

    def ready(self) -> bool:
        return self.loaded and self.text.ready()

    def drain(self) -> None:
        self.text.drain()

    async def close(self) -> None:
        await self.text.close()

    def describe(self) -> dict:
        return {"context_length": None, "training_set_size": len(self.training_set) if self.training_set else None}

    async def stream_selfies(self, request_id: str, count: int, temperature: float, top_k: int,
                             seed: int) -> AsyncIterator[list[tuple[int, str]] | int]:
        """``count`` SELFIES strings, string ``i`` from seed ``seed + i * stride`` (the engine's ``n``
        derivation): yields ``(i, string)`` pairs as the engine finishes them, a list per engine
        event, then the number of tokens generated."""
        params = SamplingParams(n=count, temperature=temperature, top_k=top_k, seed=seed,
                                max_tokens=self.text.max_len() - 1)
        texts = [""] * count
        async for ev in self.text.generate(TextRequest(request_id, params, prompt=[self.bos_id])):
            if isinstance(ev, Usage):
                yield ev.completion_tokens
                continue
            texts[ev.index] += ev.text
            if ev.finish_reason is not None:
                yield [(ev.index, texts[ev.index])]


class LocalMolVAEBackend(BatchedBackend):
    def setup(self) -> None:
        self.model = self.load_model()
        self.loaded = True

    async def start(self) -> None:
        from genserve.models.molecule.vae import interpolate

        model = self.model

        def run(items: list[tuple[str, str, int, str]]) -> list[list[str] | InputError]:
            out: list[list[str] | InputError] = []
            for start, end, steps, method in items:
                try:
                    out.append(interpolate(model, start, end, steps, method))
                except InputError as exc:  # the caller's molecule, not the batch, is at fault
                    out.append(exc)
            return out

        self.start_batcher(run)


    async def interpolate(self, start: str, end: str, steps: int, method: str) -> list[str]:
        assert self.batcher is not None
        (result,) = await self.batcher.submit_many([(start, end, steps, method)])
        if isinstance(result, InputError):
            raise result
        return result
