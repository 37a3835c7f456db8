"""In-process sentence embeddings, each input one item of a ``DynamicBatcher``, so inputs from
concurrent requests share forward passes."""

from __future__ import annotations

import asyncio

from app.backends.base import EmbeddingResult, check_token_ids
from app.backends.batching import BatchedBackend, DynamicBatcher
from app.errors import InvalidRequestError
from app.metrics import Metrics
from app.registry import ModelEntry
from models.embedding import EmbeddingModel
from models.families import load_family


class LocalEmbeddingBackend(BatchedBackend):
    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.metrics = metrics
        self.model: EmbeddingModel | None = None
        self.batcher: DynamicBatcher[list[int], list[float]] | None = None

    def setup(self) -> None:
        e = self.entry
        self.model = load_family(e.family or "", e.resolved_source or e.source or "", e.device, e.dtype)
        self.loaded = True

    async def start(self) -> None:
        assert self.model is not None
        e, m = self.entry, self.metrics

        def on_batch(size: int, waits: list[float]) -> None:
            m.batch_size.labels(e.id).observe(size)
            for w in waits:
                m.request_queue_time.labels(e.id).observe(w)

        self.batcher = DynamicBatcher(self.model.embed, max_batch_size=e.max_batch_size,
                                      max_wait_ms=e.max_wait_ms, max_waiting=e.max_waiting,
                                      on_batch=on_batch)
        self.batcher.start()


    def describe(self) -> dict:
        return {"context_length": self.model.max_tokens if self.model else None}

    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> EmbeddingResult:
        model, batcher = self.model, self.batcher
        assert model is not None and batcher is not None
        if dimensions is not None and dimensions != model.dimensions:
            raise InvalidRequestError(f"This model produces {model.dimensions}-dimensional embeddings and "
                                      "cannot shorten them.", param="dimensions")
        if isinstance(inputs[0], str):
            ids = await asyncio.to_thread(model.tokenize, inputs)  # type: ignore[arg-type]
        else:
            ids = [list(x) for x in inputs]  # type: ignore[arg-type]
            check_token_ids(ids, len(model.model.tokenizer), "input")
        for i, row in enumerate(ids):
            if len(row) > model.max_tokens:
                raise InvalidRequestError(
                    f"input[{i}] has {len(row)} tokens; this model accepts at most {model.max_tokens}.",
                    param="input", code="context_length_exceeded")
        vectors = await batcher.submit_many(ids)
        return EmbeddingResult(vectors, sum(len(r) for r in ids))
