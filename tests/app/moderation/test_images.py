"""The CLIP safety checker: loaded from a local directory in either layout, its verdicts equal to
diffusers' own ``forward``, and a score of 0.5 or more exactly where diffusers flags an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from genserve.app.moderation.images import SafetyChecker


def tiny_checker(seed: int = 0) -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(0.9)
        model.special_care_embeds_weights.fill_(0.9)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, processor


def save(model: StableDiffusionSafetyChecker, processor: CLIPImageProcessor, path: Path, pipeline: bool) -> Path:
    model_dir, proc_dir = (path / "safety_checker", path / "feature_extractor") if pipeline else (path, path)
    model.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(proc_dir)
    return path


def images(n: int, size: tuple[int, int] = (48, 40), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size[0], size[1], 3), dtype=np.uint8)


def diffusers_flags(model: StableDiffusionSafetyChecker, processor: CLIPImageProcessor, batch: np.ndarray) -> list:
    clip = processor(images=list(batch), return_tensors="pt").pixel_values
    _, flags = model(clip_input=clip, images=[im.copy() for im in batch])
    return list(flags)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline-layout", "flat"])
def test_loads_from_either_layout_and_is_deterministic(tmp_path: Path, pipeline: bool) -> None:
    model, processor = tiny_checker()
    checker = SafetyChecker.from_dir(save(model, processor, tmp_path, pipeline))
    batch = images(3)
    first = checker.scores(batch)
    assert first == checker.scores(batch)
    assert all(set(s) == {"sexual"} and 0.0 <= s["sexual"] <= 1.0 for s in first)


def test_flags_equal_diffusers_forward_and_the_score_crosses_half_with_them(tmp_path: Path) -> None:
    model, processor = tiny_checker()
    checker = SafetyChecker.from_dir(save(model, processor, tmp_path, pipeline=True))
    batch = images(6, seed=4)
    # Point concept 3 at image 2's embedding, so that it (and images close to it) is flagged.
    with torch.no_grad():
        clip = processor(images=list(batch), return_tensors="pt").pixel_values
        emb = model.visual_projection(model.vision_model(clip)[1])
        for m in (model, checker.model):
            m.concept_embeds[3] = emb[2]
    for threshold in (0.999, 0.9, 0.5, 0.0, -1.0):
        with torch.no_grad():
            for m in (model, checker.model):
                m.concept_embeds_weights[3] = threshold
        expected = diffusers_flags(model, processor, batch)
        assert checker.flags(batch) == expected, threshold
        assert [s["sexual"] >= 0.5 for s in checker.scores(batch)] == expected, threshold
    assert expected == [True] * 6  # at -1 every image is over the threshold
    with torch.no_grad():
        for m in (model, checker.model):
            m.concept_embeds_weights[3] = 0.999
    assert checker.flags(batch)[2] and sum(checker.flags(batch)) < 6  # the image itself, not all


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    model, processor = tiny_checker()
    save(model, processor, tmp_path, pipeline=False)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(Exception, match="safetensors"):
        SafetyChecker.from_dir(tmp_path)


def test_any_image_size(tmp_path: Path) -> None:
    model, processor = tiny_checker()
    checker = SafetyChecker.from_dir(save(model, processor, tmp_path, pipeline=False))
    for size in ((8, 8), (33, 17), (256, 256)):
        assert len(checker.scores(images(2, size))) == 2
