"""In-process sentence embeddings, each input one item of a ``DynamicBatcher``, so inputs from
concurrent requests share forward passes."""

from __future__ import annotations

import asyncio

from genserve.app.backends.base import EmbeddingResult, ModelFacts, check_token_ids
from genserve.app.backends.batching import BatchedBackend
from genserve.app.errors import InvalidRequestError
from genserve.models.embedding import EmbeddingModel


class LocalEmbeddingBackend(BatchedBackend):
    model: EmbeddingModel | None

    def setup(self) -> None:
        self.model = self.load_model()
        self.loaded = True

    async def start(self) -> None:
        assert self.model is not None
        self.start_batcher(self.model.embed)


    def describe(self) -> ModelFacts:
        return ModelFacts(context_length=self.model.max_tokens if self.model else None)

    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> EmbeddingResult:
        model, batcher = self.model, self.batcher
        assert model is not None and batcher is not None
        if dimensions is not None and dimensions != model.dimensions:
            raise InvalidRequestError(f"This model produces {model.dimensions}-dimensional embeddings and "
                                      "cannot shorten them.", param="dimensions")
        if isinstance(inputs[0], str):
            ids = await asyncio.to_thread(model.tokenize, inputs)
        else:
            ids = [list(x) for x in inputs]
            check_token_ids(ids, len(model.model.tokenizer), "input")  # type: ignore[attr-defined]
        for i, row in enumerate(ids):
            if len(row) > model.max_tokens:
                raise InvalidRequestError(
                    f"input[{i}] has {len(row)} tokens; this model accepts at most {model.max_tokens}.",
                    param="input", code="context_length_exceeded")
        vectors = await batcher.submit_many(ids)
        return EmbeddingResult(vectors, sum(len(r) for r in ids))
