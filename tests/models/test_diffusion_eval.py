"""genserve-diffusion's evaluation: the emoji classifier, FID, prompt accuracy, the model card.

A tiny random UNet pipeline (as in test_diffusion.py) and tiny untrained classifiers; the tests that
need the emoji set skip without the font.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.models.common.evaluation import fid
from genserve.models.common.weights import save_net
from genserve.models.diffusion import GenserveEmojiPipeline
from genserve.models.diffusion import evaluate as ev
from genserve.models.diffusion.classifier import (
    EmojiClassifier,
    EmojiClassifierConfig,
    EmojiClassifierTrainConfig,
    augment,
    fit,
    load_classifier,
    predict,
)
from genserve.models.diffusion.data import FONT, INSTALL_HINT
from genserve.models.diffusion.train import build_scheduler
from genserve.models.image.evaluate import format_table
from tests.models.test_diffusion import tiny_unet

needs_font = pytest.mark.skipif(not FONT.is_file(), reason=f"needs the emoji font: {INSTALL_HINT}")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("genserve-diffusion")
    GenserveEmojiPipeline(tiny_unet(), build_scheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def emoji():
    if not FONT.is_file():
        pytest.skip(f"needs the emoji font: {INSTALL_HINT}")
    from genserve.models.diffusion.data import load_emoji

    return load_emoji()


def tiny_classifier(names: list[str]) -> EmojiClassifier:
    torch.manual_seed(0)
    return EmojiClassifier(EmojiClassifierConfig(width=8, names=list(names))).eval()


def nearest_centroid(net: EmojiClassifier, images: torch.Tensor) -> EmojiClassifier:
    """The head set so that class i is the image whose features are nearest: every real image is named right."""
    feats = predict(net, images.float() / 255)[0]
    with torch.no_grad():
        net.head.weight.copy_(feats)
        net.head.bias.copy_(-0.5 * (feats**2).sum(1))
    return net


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    a = np.random.default_rng(0).normal(size=(400, 16))
    assert abs(fid(a, a)) < 1e-6
    small, large = fid(a, a + 0.5), fid(a, a + 1.0)
    assert small == pytest.approx(16 * 0.25, rel=1e-6) and large == pytest.approx(16.0, rel=1e-6)
    # in the classifier's features: moving the images moves their features
    net = tiny_classifier([str(i) for i in range(4)])
    x = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    f = predict(net, x)[0].numpy()
    assert abs(fid(f, f)) < 1e-4
    assert fid(f, predict(net, (x + 0.3).clamp(0, 1))[0].numpy()) > 100 * max(abs(fid(f, f)), 1e-6)


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = augment(x, torch.Generator().manual_seed(1), clean=0.0)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean(dim=(1, 2, 3)).min() > 0.01  # every image changed
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(1), clean=0.0))
    assert torch.equal(augment(x, torch.Generator().manual_seed(1), clean=1.0), x)
    # a shift fills with white, not black: a white image stays light everywhere
    white = augment(torch.ones(16, 3, 32, 32), torch.Generator().manual_seed(2), clean=0.0)
    assert white.min() > 0.6


def test_classifier_trains_and_round_trips(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8) + 255  # eight coloured blocks on white
    for i in range(8):
        images[i, :, 4 * i : 4 * i + 8, 4:28] = torch.randint(0, 200, (3, 1, 1), generator=g).to(torch.uint8)
    names = [f"block {i}" for i in range(8)]
    cfg = EmojiClassifierTrainConfig(
        minutes=10, max_steps=60, batch_size=16, width=8, eval_every=30, lr=1e-2, warmup_steps=5
    )
    net, report = fit(images, names, cfg)
    assert report["steps"] == 60 and [c["step"] for c in report["curve"]] == [30, 60]
    assert report["curve"][-1]["train_loss"] < 1.0  # from ln 8 ≈ 2.08
    assert report["clean_accuracy"] >= 0.75
    save_net(net, "emoji-classifier", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["names"] == names
    back = load_classifier(tmp_path)
    x = images.float() / 255
    assert back.config.names == names and torch.equal(predict(back, x)[1], predict(net, x)[1])


def test_independent_pixels_copy_each_pixel_from_some_image():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(3, 3, 32, 32).contiguous()
    base = ev.independent_pixels(images, 5, seed=0)
    assert base.shape == (5, 3, 32, 32)
    pixels = (base * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(-1, 3)
    assert ((pixels[:, None] == colours[None]).all(-1)).any(-1).all()  # RGB kept together
    for image in (base * 255).round().to(torch.uint8):  # drawn pixel by pixel, not image by image
        assert torch.unique(image.flatten(1), dim=1).shape[1] == 3


def test_prompt_accuracy_counts_top1_and_top5():
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4, 0], [0, 9, 8, 7, 6, 5, 4], [9, 8, 7, 6, 5, 4, 0]])
    assert ev.prompt_accuracy(logits, torch.tensor([0, 0, 6])) == pytest.approx((1 / 3, 1 / 3))
    assert ev.prompt_accuracy(logits, torch.tensor([4, 1, 1])) == pytest.approx((1 / 3, 1.0))


@needs_font
def test_eval_of_a_random_model_is_at_chance_and_real_images_score_the_floor(
    pipe_dir: Path, emoji, monkeypatch, tmp_path: Path
):
    net = nearest_centroid(tiny_classifier(emoji.names), emoji.images)
    kwargs = {"steps": 2, "names": 40, "seed": 3, "data": emoji}
    m = ev.eval_diffusion(pipe_dir, net, **kwargs)
    assert {
        "generated",
        "generated_heldout",
        "real_vs_real_floor",
        "independent_pixels_baseline",
        "sampler",
        "chance_top1",
        "chance_top5",
        "weights_sha256",
    } <= set(m)
    assert m["sampler"] == {"scheduler": "dpmsolver++", "steps": 2, "guidance": 4.0}
    assert m["names"] == 40 and m["chance_top1"] == pytest.approx(1 / 1358)
    n_held = m["generated_heldout"]["n"]
    assert m["generated"]["n"] + n_held == 40 and n_held >= 2
    assert m["real_vs_real_floor"]["n"] == m["independent_pixels_baseline"]["n"] == m["generated"]["n"]
    assert m["generated"]["top1"] <= 0.1 and m["generated"]["top5"] <= 0.2  # noise from a random UNet
    assert m["real_vs_real_floor"]["top1"] >= 0.95  # the instrument names the real images
    assert m["independent_pixels_baseline"]["top1"] is None
    assert m["generated"]["fid"] > m["real_vs_real_floor"]["fid"]
    assert json.loads((pipe_dir / "eval" / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert (pipe_dir / "eval" / "samples.png").is_file()

    # a generator that draws the real emoji of its prompt: top-1 of the instrument, FID of the floor
    seen = []

    def real(_pipe, prompts: list[str], seeds: list[int], *_args, **_kwargs) -> torch.Tensor:
        seen.append(seeds)
        return torch.stack([emoji.images[emoji.index(p)] for p in prompts]).float() / 255

    monkeypatch.setattr(ev, "generate", real)
    perfect = ev.eval_diffusion(pipe_dir, net, **kwargs)
    assert seen[0] == [3 + i for i in ev.selected(len(emoji.names), 40)]  # seed + index of the name
    assert perfect["generated"]["top1"] == perfect["real_vs_real_floor"]["top1"] >= 0.95
    assert perfect["generated_heldout"]["top1"] >= 0.95
    assert perfect["generated"]["fid"] == pytest.approx(perfect["real_vs_real_floor"]["fid"])

    line = format_table([m]).splitlines()[1]
    assert line.startswith("genserve-diffusion") and f"{m['generated']['fid']:.2f}" in line and line.endswith("-")


def test_card_carries_the_table_only_for_the_weights_it_measured(pipe_dir: Path, tmp_path: Path):
    import shutil

    path = tmp_path / "genserve-diffusion"
    shutil.copytree(pipe_dir, path, ignore=shutil.ignore_patterns("eval"))
    report = {
        "parameters": 1_642_339,
        "train_emoji": 1205,
        "heldout_emoji": 153,
        "steps": 100,
        "epochs": 2.7,
        "minutes": 3.0,
        "final_train_loss": 0.02,
        "heldout_loss": 0.03,
        "sampler": "dpmsolver++, 25 steps, guidance 4.0",
        "machine": "x86_64, 2 thread(s)",
        "config": {
            "minutes": 3.0,
            "threads": 2,
            "batch_size": 32,
            "lr": 6e-4,
            "prediction_type": "v_prediction",
            "init_from": "/somewhere/stage1",
        },
    }
    first = {**report, "steps": 50, "epochs": 1.3, "config": {"minutes": 34.0, "threads": 1, "batch_size": 32,
                                                              "lr": 1e-3, "init_from": None}}
    (path / "training_report.json").write_text(json.dumps({**report, "history": [first]}))
    ev.write_card(path)
    card = (path / "README.md").read_text()
    assert "Measured quality" not in card and "1.64M-parameter" in card and "2 stages" in card
    assert "| 1 | `genserve train diffusion --minutes 34 --threads 1 --prediction-type epsilon --lr 0.001` |" in card
    assert "--prediction-type v_prediction --lr 0.0006 --init-from STAGE1` | v_prediction | 100 × 32 |" in card

    row = {"n": 1205, "fid": 12.345, "top1": 0.4321, "top5": 0.6543}
    metrics = {
        "model": "genserve-diffusion",
        "seed": 0,
        "samples_per_name": 1,
        "names": 1358,
        "all_names": 1358,
        "sampler": {"scheduler": "dpmsolver++", "steps": 25, "guidance": 4.0},
        "heldout_images": 153,
        "generated": row,
        "generated_heldout": {**row, "n": 153, "fid": 40.0, "top1": 0.05, "top5": 0.1},
        "real_vs_real_floor": {**row, "fid": 1.5, "top1": 1.0, "top5": 1.0},
        "independent_pixels_baseline": {**row, "fid": 300.25, "top1": None, "top5": None},
        "chance_top1": 1 / 1358,
        "chance_top5": 5 / 1358,
        "classifier": {"classes": 1358, "clean_accuracy": 0.999, "augmented_accuracy": 0.95},
        "weights_sha256": ev.weights_hash(path),
    }
    (path / "eval").mkdir()
    (path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    ev.write_card(path)  # the metrics of these weights are found on disk
    card = (path / "README.md").read_text()
    assert "not Inception FID" in card and "DPM-Solver++, 25 steps, guidance 4" in card
    assert "| images | n | FID ↓ | top-1 | top-5 |" in card
    assert "| generated, training names | 1205 | 12.35 | 43.2% | 65.4% |" in card
    assert "| 153 | 40.00 | 5.0% | 10.0% |" in card and "| 1205 | 1.50 | 100.0% | 100.0% |" in card
    assert "| independent pixels (baseline) | 1205 | 300.25 | – | – |" in card
    assert '"red apple"' in card and "accuracy 0.999" in card

    (path / "eval" / "metrics.json").write_text(json.dumps({**metrics, "weights_sha256": "0" * 16}))
    ev.write_card(path)  # an eval of other weights is not shown
    assert "Measured quality" not in (path / "README.md").read_text()
