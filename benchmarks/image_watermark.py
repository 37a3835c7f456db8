"""The image watermark's robustness and false-positive rate, through a served ``/v1/provenance/verify``.

One ``genserve serve`` runs the embedded image models as shipped. For each model at its default and
largest sizes, ``--images`` seeded images are generated; those that carry the watermark are altered
(re-encoded, resized, cropped, brightened, noised) and sent to verify, which reports the agreeing
bits and whether it detects the model. Then images genserve did not make go through the same verify
(every model's payload, and the crop search, are tried on each)::

    .venv/bin/python benchmarks/image_watermark.py

- emoji: every named emoji of Noto Color Emoji rendered at 256x256 by Pillow (the font Debian ships,
  the diffusion model's training source, drawn here afresh at the served size);
- digits: scikit-learn's 1,797 handwritten digits, enlarged to 256x256;
- photos: 256x256 crops at random places of the two photographs scikit-learn ships, half mirrored.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.text_serving import builtin_entry, cpu_name, registry_server  # noqa: E402

MODELS = {  # model: (default size, largest size, request extras)
    "genserve-diffusion": ("32x32", "256x256", {"prompt": "red apple", "num_inference_steps": 10}),
    "genserve-gan": ("8x8", "64x64", {"prompt": "7"}),
    "genserve-vae": ("8x8", "64x64", {"prompt": "3"}),
    "genserve-flow": ("8x8", "64x64", {"prompt": "5"}),
}
PROMPTS = ["red apple", "smiling face", "blue car", "green tree", "yellow star", "cat face", "rocket", "pizza"]


def encoded(rgb: np.ndarray, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt, **kw)
    return out.getvalue()


def resized(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    im = Image.fromarray(rgb).resize((int(w * factor), int(h * factor)), Image.Resampling.BICUBIC)
    return np.asarray(im.resize((w, h), Image.Resampling.BICUBIC))


def cropped(rgb: np.ndarray, share: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    dy, dx = int(h * share / 2), int(w * share / 2)
    return rgb[dy:h - dy, dx:w - dx]


def bright(rgb: np.ndarray, factor: float) -> np.ndarray:
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(rgb)).enhance(factor))


def noised(rgb: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


ATTACKS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "as served (PNG)": lambda m, s: encoded(m, "PNG"),
    "JPEG q90": lambda m, s: encoded(m, "JPEG", quality=90),
    "JPEG q75": lambda m, s: encoded(m, "JPEG", quality=75),
    "JPEG q50": lambda m, s: encoded(m, "JPEG", quality=50),
    "WebP q80 (Pillow's default)": lambda m, s: encoded(m, "WEBP", quality=80),
    "resize to 1/2 and back (bicubic)": lambda m, s: encoded(resized(m, 0.5), "PNG"),
    "resize to 3/4 and back (bicubic)": lambda m, s: encoded(resized(m, 0.75), "PNG"),
    "crop 10% (5% off each edge)": lambda m, s: encoded(cropped(m, 0.10), "PNG"),
    "crop 10%, then JPEG q90": lambda m, s: encoded(cropped(m, 0.10), "JPEG", quality=90),
    "brightness x0.9": lambda m, s: encoded(bright(m, 0.9), "PNG"),
    "brightness x1.1": lambda m, s: encoded(bright(m, 1.1), "PNG"),
    "Gaussian noise, sigma 5": lambda m, s: encoded(noised(m, 5, s), "PNG"),
}


async def verify(client: httpx.AsyncClient, data: bytes) -> dict | None:
    r = await client.post("/v1/provenance/verify", files={"file": ("f", data)})
    r.raise_for_status()
    return r.json()["watermark"]


async def robustness(client: httpx.AsyncClient, images: int) -> tuple[list[str], dict[str, list[dict]]]:
    notes: list[str] = []
    rows: dict[str, list[dict]] = {}
    for model, (default, largest, extras) in MODELS.items():
        for size in (default, largest):
            made = []
            for k in range(images):
                body = {**extras, "model": model, "size": size, "seed": 100 + k}
                if model == "genserve-diffusion":
                    body["prompt"] = PROMPTS[k % len(PROMPTS)]
                r = await client.post("/v1/images/generations", json=body)
                r.raise_for_status()
                made.append((base64.b64decode(r.json()["data"][0]["b64_json"]), r.json()["provenance"]))
            provenance = made[0][1]
            if not provenance["watermarked"]:
                notes.append(f"| {model} | {size} | not watermarked: {provenance['reason'].split(';')[0]} |")
                continue
            pixels = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png, _ in made]
            for attack, fn in ATTACKS.items():
                got = [await verify(client, fn(p, k)) for k, p in enumerate(pixels)]
                rows.setdefault(f"{model} {size}", []).append({
                    "attack": attack, "accuracy": [g["bit_accuracy"] for g in got],
                    "detected": sum(g["detected"] and g["model"] == model for g in got), "n": len(got)})
    return notes, rows


def emoji_renderings(side: int) -> Iterator[np.ndarray]:
    from PIL import ImageFont

    from genserve.models.diffusion.data import FONT, FONT_SIZE, emoji_codepoints, render

    font = ImageFont.truetype(str(FONT), FONT_SIZE)
    for cp in emoji_codepoints(FONT):
        image = render(chr(cp), font, side)
        if image is not None:
            yield image


def digits(side: int) -> Iterator[np.ndarray]:
    from sklearn.datasets import load_digits

    for d in load_digits().images:
        grey = (255 - d * 255 / 16).astype(np.uint8)
        yield np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.NEAREST).convert("RGB"))


def photo_crops(side: int, count: int) -> Iterator[np.ndarray]:
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    for k in range(count):
        photo = photos[k % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = photo[top:top + side, left:left + side]
        yield crop[:, ::-1] if k % 2 else crop


async def false_positives(client: httpx.AsyncClient, photos: int) -> list[dict]:
    out = []
    for name, source in [("emoji (Noto Color Emoji, 256x256)", emoji_renderings(256)),
                         ("digits (scikit-learn, 256x256)", digits(256)),
                         ("photo crops (scikit-learn, 256x256)", photo_crops(256, photos))]:
        got = [await verify(client, encoded(rgb, "PNG")) for rgb in source]
        out.append({"set": name, "n": len(got), "flagged": sum(g["detected"] for g in got),
                    "max_bits": max(g["bits_agreeing"] for g in got),
                    "min_p": min(g["p_value"] for g in got)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images per model and size")
    parser.add_argument("--photos", type=int, default=300, help="photo crops in the false-positive set")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args(argv)
    entries = [builtin_entry(m) for m in MODELS]

    async def run(url: str) -> tuple[list[str], dict[str, list[dict]], list[dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            notes, rows = await robustness(client, args.images)
            return notes, rows, await false_positives(client, args.photos)

    with tempfile.TemporaryDirectory() as tmp, registry_server(entries, Path(tmp), args.threads, 600) as url:
        notes, rows, fp = asyncio.run(run(url))
    print(f"# image_watermark: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {platform.machine()}, "
          f"{args.images} images per model and size\n")
    print("| model | size | watermark |\n|---|---|---|")
    print("\n".join(notes))
    for key, attacks in rows.items():
        print(f"\n{key}: bit accuracy (mean, min) and detections\n")
        print("| alteration | bit accuracy, mean | min | detected |\n|---|---:|---:|---:|")
        for a in attacks:
            print(f"| {a['attack']} | {statistics.mean(a['accuracy']):.3f} | {min(a['accuracy']):.3f} | "
                  f"{a['detected']}/{a['n']} |")
    print("\nImages genserve did not make (every payload and the crop search tried on each):\n")
    print("| set | images | detected | most agreeing bits | smallest p-value |\n|---|---:|---:|---:|---:|")
    for r in fp:
        print(f"| {r['set']} | {r['n']} | {r['flagged']} | {r['max_bits']}/64 | {r['min_p']:.2g} |")
    total, flagged = sum(r["n"] for r in fp), sum(r["flagged"] for r in fp)
    print(f"| all | {total} | {flagged} ({flagged / total:.2%}) | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
