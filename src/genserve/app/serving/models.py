"""``/v1/models``: the model cards, built from the registry entries and their backends' state."""

from __future__ import annotations

from genserve.app.backends.base import ServedModel
from genserve.app.backends.manager import ModelManager
from genserve.app.errors import ModelNotFoundError
from genserve.app.schemas.models import ModelCard, ModelList
from genserve.app.tenancy import key_allows


class ModelsServing:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    async def list(self, probe: bool = False) -> ModelList:
        """``probe``: a gateway asks; answer from the states already known instead of checking them."""
        ready = self.manager.known_readiness() if probe else await self.manager.readiness()
        return ModelList(data=[_card(b, ready[mid]) for mid, b in self.manager.backends.items()
                               if key_allows(b.entry)])

    async def get(self, model_id: str) -> ModelCard:
        backend = self.manager.backends.get(model_id)
        if backend is None or not key_allows(backend.entry):
            raise ModelNotFoundError(f"The model '{model_id}' does not exist.", param="model")
        return _card(backend, await backend.check_ready())


def _card(backend: ServedModel, ready: bool) -> ModelCard:
    e = backend.entry
    facts = backend.describe()
    return ModelCard(id=e.id, created=backend.created, modality=e.modality, tasks=e.tasks, ready=ready,
                     backend=e.backend, context_length=facts.context_length,
                     sample_rate=facts.sample_rate, image_kind=facts.image_kind,
                     sizes=[f"{w}x{h}" for w, h in facts.sizes] if facts.sizes else None,
                     native_size="{}x{}".format(*facts.native_size) if facts.native_size else None,
                     class_names=facts.class_names, can_inpaint=facts.can_inpaint)
