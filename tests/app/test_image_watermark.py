"""genserve's image watermark (app/provenance/image_watermark.py) on pictures made here: it reads back
whole, survives what the robustness table promises, stays where pixels are saturated, changes a
picture by a few levels only, and is not read into pictures that do not carry it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from genserve.app.provenance import image_watermark as iw

BITS = iw.payload("test-secret", "genserve-diffusion")


def agreement(rgb: np.ndarray, bits: np.ndarray = BITS) -> int:
    return int(np.sum(iw.read(rgb) == bits))


def picture(seed: int, size: int = 256, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """An emoji-like picture: flat saturated shapes on a flat background, the hard case for a chroma mark."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    return np.asarray(im)


def recode(rgb: np.ndarray, fmt: str, **kw: object) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt, **kw)
    return np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("RGB"))


def test_payloads_differ_by_model_and_secret() -> None:
    assert BITS.shape == (64,) and BITS.dtype == bool and BITS.sum() == 32 and not np.any(BITS[::2] == BITS[1::2])
    others = [iw.payload("test-secret", "genserve-gan"), iw.payload("other-secret", "genserve-diffusion")]
    assert all(iw.BITS - np.sum(o == BITS) >= 16 for o in others)
    assert np.array_equal(iw.payload("test-secret", "genserve-diffusion"), BITS)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (40, 120, 200)], ids=["white", "black", "blue"])
def test_it_reads_back_whole_and_changes_a_picture_by_a_few_levels(background: tuple[int, int, int]) -> None:
    for seed in range(4):
        rgb = picture(seed, background=background)
        marked = iw.embed(rgb, BITS)
        assert agreement(marked) == 64, seed
        diff = marked.astype(int) - rgb
        psnr = 10 * np.log10(255 ** 2 / np.mean(diff ** 2))
        assert np.abs(diff).max() <= 12 and psnr > 38, (seed, np.abs(diff).max(), psnr)


@pytest.mark.parametrize("size", [(256, 256), (320, 256), (259, 301), (512, 512)])
def test_sizes_that_fit_carry_it_and_pixels_past_the_last_block_stay(size: tuple[int, int]) -> None:
    w, h = size
    rgb = np.asarray(Image.fromarray(picture(7, 512)).resize((w, h)))
    marked = iw.embed(rgb, BITS)
    assert marked.shape == rgb.shape and agreement(marked) == 64
    assert np.array_equal(marked[h // 8 * 8:], rgb[h // 8 * 8:]) and np.array_equal(marked[:, w // 8 * 8:],
                                                                                     rgb[:, w // 8 * 8:])


def test_small_pictures_are_refused_not_marked_badly() -> None:
    assert not iw.fits(255, 256) and not iw.fits(1024, 63) and iw.fits(256, 256)
    with pytest.raises(ValueError, match="too small"):
        iw.embed(picture(0, 128), BITS)
    with pytest.raises(ValueError, match="too small"):
        iw.read(picture(0, 32))


@pytest.mark.parametrize(("attack", "at_least"), [
    ("jpeg90", 60), ("webp90", 58), ("crop-right-bottom", 64), ("png", 64),
])
def test_it_survives_recompression_and_a_crop_that_keeps_the_corner(attack: str, at_least: int) -> None:
    worst = 64
    for seed in range(6):
        marked = iw.embed(picture(seed), BITS)
        attacked = {
            "jpeg90": lambda m: recode(m, "JPEG", quality=90),
            "webp90": lambda m: recode(m, "WEBP", quality=90),
            "crop-right-bottom": lambda m: m[:230, :230],
            "png": lambda m: recode(m, "PNG"),
        }[attack](marked)
        worst = min(worst, agreement(attacked))
    assert worst >= at_least


def test_pictures_it_did_not_mark_are_not_detected_even_by_the_search() -> None:
    payloads = {"a": BITS, "b": iw.payload("test-secret", "genserve-gan")}
    pictures = [picture(seed, background=tuple(int(c) for c in np.random.default_rng(seed).integers(0, 256, 3)))
                for seed in range(8)]
    pictures.append(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    for rgb in pictures:  # measured on 1,000+ real pictures in docs/provenance.md
        found = iw.detect(rgb, payloads)
        assert found.model is None and found.agreeing < iw.THRESHOLD and found.p_value > 1e-4, found


def test_the_chance_figures_are_the_binomial_tail() -> None:
    assert iw.p_value(0) == 1.0 and iw.p_value(64) == 2.0 ** -64
    assert 1e-7 < iw.p_value(iw.THRESHOLD) < 1e-6


def test_a_crop_from_any_side_is_found_by_the_search_and_says_so() -> None:
    payloads = {"genserve-diffusion": BITS, "genserve-gan": iw.payload("test-secret", "genserve-gan")}
    for seed, (top, left) in enumerate([(13, 13), (0, 21), (26, 3)]):
        marked = iw.embed(picture(seed), BITS)
        found = iw.detect(marked[top:top + 230, left:left + 230], payloads)
        assert found.model == "genserve-diffusion" and found.searched and found.agreeing >= iw.SEARCH_THRESHOLD
        assert found.p_value < 1e-7  # with all 4,096 tries of both payloads counted
    whole = iw.detect(iw.embed(picture(9), BITS), payloads)
    assert whole.model == "genserve-diffusion" and not whole.searched and whole.agreeing == 64

