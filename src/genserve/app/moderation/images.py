"""The image output check: diffusers' CLIP concept safety checker, loaded from a local directory.

``StableDiffusionSafetyChecker`` embeds an image with CLIP's vision tower and compares it (cosine) with
17 "concept" embeddings and 3 "special care" ones, each with its own threshold; an image whose margin
over any concept threshold is positive (after a 0.01 bonus once a special-care concept is hit) is
NSFW. diffusers' ``forward`` then blacks the image out; genserve instead computes the same margins
(``margins``) and reports them as OpenAI's ``sexual`` category, so that policy decides:

    score = sigmoid((margin - 0.0005) / 0.01)

diffusers rounds each margin to 3 decimals and flags a margin > 0, so ``score >= 0.5`` exactly when
diffusers would flag the image (``flags`` returns its verdicts, and a test holds them equal to its own
``forward``). Known weaknesses: it judges sexual content only (no violence or gore), its concepts
are CLIP's, and small or stylised images (8x8 digits, emoji) are far from what it was made for.

An operator points a model's policy at a checker with ``moderation: {image_checker: DIR}``: either a
diffusers pipeline directory (``DIR/safety_checker`` + ``DIR/feature_extractor``) or one directory with
the checker's config and weights and a ``preprocessor_config.json``. Safetensors only; nothing is
downloaded or unpickled.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch


class SafetyChecker:
    """Implements ``base.ImageClassifier`` (name ``safety_checker``)."""

    name = "safety_checker"

    def __init__(self, model: Any, processor: Any) -> None:  # diffusers' checker, CLIP's image processor
        self.model, self.processor = model, processor
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: Path | str, device: str = "cpu") -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        root = Path(path)
        model_dir, proc_dir = root, root
        if (root / "safety_checker").is_dir():
            model_dir, proc_dir = root / "safety_checker", root / "feature_extractor"
        model = StableDiffusionSafetyChecker.from_pretrained(model_dir, use_safetensors=True, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(proc_dir, local_files_only=True)
        return cls(model.to(device).eval(), processor)

    @torch.inference_mode()
    def margins(self, images: np.ndarray) -> np.ndarray:
        """Each image's largest concept margin (diffusers' ``concept_scores``, rounded as it rounds them)."""
        model = self.model
        with self._lock:
            pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
            param = next(model.parameters())
            pooled = model.vision_model(pixels.to(param.device, param.dtype))[1]
            emb = torch.nn.functional.normalize(model.visual_projection(pooled).float())
            special = emb @ torch.nn.functional.normalize(model.special_care_embeds.float()).T
            concept = emb @ torch.nn.functional.normalize(model.concept_embeds.float()).T
            special_w = model.special_care_embeds_weights.tolist()
            concept_w = model.concept_embeds_weights.tolist()
        # diffusers' arithmetic, to the rounding: float32 cosines minus Python-float thresholds.
        special_np, concept_np = special.numpy().astype(np.float32), concept.numpy().astype(np.float32)
        out = np.empty(len(images))
        for i in range(len(images)):
            adjustment = 0.0
            for k, w in enumerate(special_w):  # diffusers: the bonus applies from the first hit on
                if round(special_np[i, k] - w + adjustment, 3) > 0:
                    adjustment = 0.01
            out[i] = max(round(concept_np[i, k] - w + adjustment, 3) for k, w in enumerate(concept_w))
        return out

    def flags(self, images: np.ndarray) -> list[bool]:
        """diffusers' ``has_nsfw_concepts`` for (N, H, W, 3) uint8 images."""
        return [bool(m > 0) for m in self.margins(images)]

    def scores(self, images: np.ndarray) -> list[dict[str, float]]:
        return [{"sexual": 1.0 / (1.0 + math.exp(-(m - 0.0005) / 0.01))} for m in self.margins(images)]
