"""The training set of ``genserve-diffusion``: the Noto Color Emoji font, one 32×32 RGB image per emoji.

The font ships in the Debian package ``fonts-noto-color-emoji`` as a CBDT bitmap font, which Pillow
renders only at its native size of 109 px (``embedded_color=True``). Each glyph is drawn on a
transparent canvas, centred on a square, composited on white and downscaled with a Lanczos filter.
The caption of an emoji is its Unicode character name, lower-cased (U+1F34E → "red apple").

Only single code points with a name are used: ZWJ sequences, flags, keycaps and skin-tone variants
have no name that ``unicodedata`` can build, and the latter two would repeat a base image. One
emoji in ten (by a stable hash of its name) is held out of training.

Rendering takes about half a minute, so the result is cached as safetensors under
``~/.cache/genserve/diffusion/`` (never committed), keyed by the font file and :data:`RENDER_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only size a CBDT bitmap font renders at
RESOLUTION = 32
RENDER_VERSION = 1  # bump when rendering changes, to invalidate caches
HELDOUT_EVERY = 10
CACHE_DIR = Path.home() / ".cache" / "genserve" / "diffusion"
INSTALL_HINT = "apt-get install fonts-noto-color-emoji"

# Code points in the font that are not emoji pictures of their own: regional indicators (flags come
# in pairs), skin-tone modifiers, tag characters, and the keycap / joiner / selector helpers.
EXCLUDED_RANGES = ((0x1F1E6, 0x1F1FF), (0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F))
EXCLUDED_CATEGORIES = {"Cc", "Cf", "Zs", "Mn", "Me", "Nd", "Po", "Co"}


@dataclass
class EmojiSet:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, on white
    names: list[str]      # N captions, e.g. "red apple"
    codepoints: list[int]

    def split(self, heldout: bool) -> EmojiSet:
        keep = [i for i, name in enumerate(self.names) if is_heldout(name) == heldout]
        return EmojiSet(self.images[keep], [self.names[i] for i in keep], [self.codepoints[i] for i in keep])

    def index(self, name: str) -> int:
        return self.names.index(name)


def is_heldout(name: str) -> bool:
    """One name in :data:`HELDOUT_EVERY`, by a hash that does not change between runs or machines."""
    return hashlib.sha256(name.encode()).digest()[0] % HELDOUT_EVERY == 0


def emoji_codepoints(font: Path = FONT) -> list[int]:
    """The font's single code points that are emoji with a Unicode name, in code point order."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(font), lazy=True).getBestCmap()
    return [cp for cp in sorted(cmap)
            if unicodedata.name(chr(cp), None) and unicodedata.category(chr(cp)) not in EXCLUDED_CATEGORIES
            and not any(lo <= cp <= hi for lo, hi in EXCLUDED_RANGES)]


def render(text: str, font: object, resolution: int = RESOLUTION) -> np.ndarray | None:
    """(resolution, resolution, 3) uint8 of ``text`` centred on white, or None where nothing is drawn."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    if right <= left or bottom <= top:
        return None
    side = max(right - left, bottom - top)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    origin = ((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top)
    ImageDraw.Draw(canvas).text(origin, text, font=font, embedded_color=True)
    if canvas.getchannel("A").getbbox() is None:
        return None
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    small = Image.alpha_composite(white, canvas).convert("RGB").resize((resolution, resolution), Image.LANCZOS)
    return np.array(small)  # writable copy


def render_emoji(font_path: Path = FONT) -> EmojiSet:
    from PIL import ImageFont

    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    images, names, cps = [], [], []
    for cp in emoji_codepoints(font_path):
        image = render(chr(cp), font)
        if image is None:
            continue
        images.append(torch.from_numpy(image).permute(2, 0, 1))  # (3, H, W)
        names.append(unicodedata.name(chr(cp)).lower())
        cps.append(cp)
    return EmojiSet(torch.stack(images).contiguous(), names, cps)


def cache_path(font_path: Path = FONT) -> Path:
    stat = font_path.stat()
    key = hashlib.sha256(f"{font_path}:{stat.st_size}:{stat.st_mtime_ns}:{RENDER_VERSION}".encode()).hexdigest()
    return CACHE_DIR / f"emoji-{RESOLUTION}px-{key[:16]}.safetensors"


def load_emoji(font_path: Path = FONT, cache: bool = True) -> EmojiSet:
    """All named single-code-point emoji of the font, rendered (or read from the cache)."""
    if not font_path.is_file():
        raise FileNotFoundError(f"{font_path} not found: the emoji data set needs the font ({INSTALL_HINT})")
    path = cache_path(font_path)
    if cache and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        return EmojiSet(tensors["images"], json.loads(meta["names"]), tensors["codepoints"].tolist())
    data = render_emoji(font_path)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": data.images, "codepoints": torch.tensor(data.codepoints, dtype=torch.int64)},
                  str(path), metadata={"names": json.dumps(data.names)})
        log.info("rendered %d emoji to %s", len(data.names), path)
    return data
