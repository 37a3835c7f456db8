"""genserve's invisible image watermark: a keyed 64-bit payload in the chroma of the picture.

The scheme is invisible-watermark's ``dwtDctSvd`` (the stronger sibling of the ``dwtDct`` that Stable
Diffusion's reference code embeds): the U channel (YUV) is split by a one-level Haar wavelet; its
low band is cut into 4x4 blocks (8x8 pixels each); each block's largest singular value after a DCT is
moved to the centre of the quarter of a step of ``SCALE`` that says its bit (quantisation index
modulation). It is written here, vectorised, rather than imported: the library needs the desktop
build of OpenCV (``opencv-python``, which wants libGL on a server and clashes with the headless
build) for a colour conversion and a 4x4 DCT, and its encoder swaps the wavelet's horizontal and
vertical detail bands when it puts the picture back together. Three changes of ours:

- bit ``(i % 8) * 8 + j % 8`` goes to block row ``i``, column ``j`` (a tile of the payload), not the
  library's running count, so a crop keeps every block's bit and ``detect`` can find its grid again;
- each singular value moves to the nearest value of its bit (at most half a step), not up from the
  bottom of its step (up to three quarters), and never below the next singular value;
- the colour change is made where the pixels can take it: the least RGB change that gives each
  pixel its new U, with channels at 0 or 255 held there and the others doing their share (the
  library's U change is lost on white and black, which is most of an emoji's background).

Detection compares the 64 bits read with each marked model's payload: ``THRESHOLD`` of 64 or more
agreeing happens by chance with probability 2.3e-7 per model (the binomial tail); a picture cropped
at its top or left is searched for (``detect``), at a stricter threshold. The measured robustness
and false-positive rate (0 of 3,455 images genserve did not make) are in docs/provenance.md.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pywt
from scipy.fft import dctn, idctn

SCHEME = "genserve-dwt-dct-svd-v1"
BITS = 64
TILE = 8  # the payload as an 8x8 tile of blocks
SCALE = 36.0  # the quantisation step of the singular values (the library's default for U)
BLOCK = 4  # DCT blocks of the low band: 8x8 pixels
PIXELS_PER_BLOCK = 2 * BLOCK  # the Haar low band is half the size of the picture
MIN_SIDE = TILE * PIXELS_PER_BLOCK  # 64: one whole tile
MIN_PIXELS = 256 * 256  # the library's own minimum: 1,024 blocks, 16 for each bit
THRESHOLD = 52  # agreeing bits (of 64) for a detection where the blocks sit as marked
READ_SIDE = 1024  # the square read where the blocks sit: 16,384 blocks, 256 for each bit
SEARCH_SIDE = 256  # the square searched for a cropped picture's grid: 1,024 blocks, 16 for each bit
SEARCH_TRIES = PIXELS_PER_BLOCK ** 2 * TILE ** 2  # 64 grid phases x 64 payload shifts
SEARCH_THRESHOLD = 58  # agreeing bits for a detection found by that search

# OpenCV's RGB -> YUV (COLOR_RGB2YUV): Y = .299R + .587G + .114B, U = .492(B - Y) + 128, V = .877(R - Y) + 128
_U = np.array([-0.492 * 0.299, -0.492 * 0.587, 0.492 * (1 - 0.114)])


def payload(secret: str, model_id: str) -> np.ndarray:
    """The 64 bits ``model_id``'s images carry under ``secret``: 32 keyed bits, each followed by its
    complement, so a payload is half ones and its pairs sit side by side. A flat or smooth picture
    (whose neighbouring blocks read alike) then agrees with about half of any payload, never with
    most of one, and the payloads of two models or two secrets differ."""
    digest = hashlib.sha256(f"genserve image watermark\0{secret}\0{model_id}".encode()).digest()
    keyed = np.unpackbits(np.frombuffer(digest[:BITS // 16], dtype=np.uint8)).astype(bool)
    return np.stack([keyed, ~keyed], axis=1).reshape(BITS)


def fits(width: int, height: int) -> bool:
    """Whether an image of this size takes the watermark (smaller ones have too few blocks to carry
    it reliably)."""
    return width * height >= MIN_PIXELS and min(width, height) >= MIN_SIDE


def embed(rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``rgb`` ((H, W, 3) uint8) carrying ``bits``; pixels beyond the last whole 8x8 block are left as they are."""
    if not fits(rgb.shape[1], rgb.shape[0]):
        raise ValueError(f"a {rgb.shape[1]}x{rgb.shape[0]} image is too small for the watermark")
    h, w = _whole(rgb)
    x = rgb[:h, :w].astype(np.float64)
    u = _chroma(rgb)
    low, details = pywt.dwt2(u, "haar")
    coeffs = dctn(_blocks(low), axes=(-2, -1), norm="ortho")
    left, s, right = np.linalg.svd(coeffs)
    rows, cols = s.shape[:2]
    index = _tile_index(rows, cols)
    # the fraction of a step that says each block's bit; the value moves to the nearest such point
    want = np.asarray(bits, dtype=np.float64)[index] * 0.5 + 0.25
    target = (np.round(s[..., 0] / SCALE - want) + want) * SCALE
    # never below the next singular value (it would become the largest, and the one read back)
    target += SCALE * np.ceil(np.maximum(s[..., 1] - target, 0.0) / SCALE + (target <= s[..., 1]) * 1e-9)
    s[..., 0] = target
    marked_low = _unblocks(idctn((left * s[..., None, :]) @ right, axes=(-2, -1), norm="ortho"))
    du = pywt.idwt2((marked_low, details), "haar") - u
    out = rgb.copy()
    out[:h, :w] = np.clip(np.rint(x + _rgb_change(x, du)), 0, 255).astype(np.uint8)
    return out


def p_value(agreeing: int) -> float:
    """The chance that ``agreeing`` or more of 64 unrelated bits match (a fair coin's binomial tail)."""
    return sum(math.comb(BITS, k) for k in range(agreeing, BITS + 1)) / 2 ** BITS


@dataclass(frozen=True)
class Detection:
    model: str | None  # the payload's owner, when detected
    agreeing: int  # bits of the best payload read back (where its blocks sit, or the search's best)
    threshold: int  # the agreeing bits a detection needs where ``agreeing`` was read
    p_value: float  # the chance that a picture without any of the payloads does this well (all tries counted)
    searched: bool  # read by the search over crops (else where the blocks sit unmoved)


def read(rgb: np.ndarray) -> np.ndarray:
    """The 64 bits ``rgb`` carries, read where its blocks sit as marked (whatever it
    carries: only a comparison with a payload says). At most the first ``READ_SIDE`` square is read."""
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ValueError(f"a {rgb.shape[1]}x{rgb.shape[0]} image is too small to carry the watermark")
    return _bits(_chroma(rgb[:READ_SIDE, :READ_SIDE]), _ROLLS[:1])[0]


def detect(rgb: np.ndarray, payloads: dict[str, np.ndarray]) -> Detection:
    """Whether ``rgb`` carries one of ``payloads``: first where its blocks sit as marked (``THRESHOLD``),
    then, for a picture cropped at its top or left, over every grid phase (8x8 pixels) and payload
    shift (8x8 blocks) of a ``SEARCH_SIDE`` square: 4,096 more tries, hence the stricter
    ``SEARCH_THRESHOLD``. The p-value counts every payload and every try made."""
    owners = list(payloads)
    table = np.stack([payloads[m] for m in owners])  # (M, 64)
    aligned = (read(rgb) == table).sum(axis=1)
    k = int(np.argmax(aligned))
    if aligned[k] >= THRESHOLD:
        return _detection(owners[k], int(aligned[k]), THRESHOLD, len(owners), searched=False)
    chroma = _chroma(rgb[:SEARCH_SIDE + PIXELS_PER_BLOCK, :SEARCH_SIDE + PIXELS_PER_BLOCK])
    side = min(SEARCH_SIDE, (min(chroma.shape) - PIXELS_PER_BLOCK) // PIXELS_PER_BLOCK * PIXELS_PER_BLOCK)
    if side < MIN_SIDE:
        return _detection(owners[k], int(aligned[k]), THRESHOLD, len(owners), searched=False)
    best, best_owner = -1, 0
    for dy in range(PIXELS_PER_BLOCK):
        for dx in range(PIXELS_PER_BLOCK):
            bits = _bits(chroma[dy:dy + side, dx:dx + side], _ROLLS)  # (64 shifts, 64 bits)
            agree = (bits[:, None, :] == table[None]).sum(axis=2)  # (shifts, M)
            shift, owner = np.unravel_index(int(np.argmax(agree)), agree.shape)
            if agree[shift, owner] > best:
                best, best_owner = int(agree[shift, owner]), int(owner)
    tries = len(owners) * (1 + SEARCH_TRIES)  # the aligned read and the search, for every payload
    if best >= SEARCH_THRESHOLD:
        return _detection(owners[best_owner], best, SEARCH_THRESHOLD, tries, searched=True)
    # nothing found: the closer of the two reads, its chance counted over every try made
    if p_value(int(aligned[k])) <= p_value(best):
        return _detection(owners[k], int(aligned[k]), THRESHOLD, tries, searched=False)
    return _detection(owners[best_owner], best, SEARCH_THRESHOLD, tries, searched=True)


def _detection(owner: str, agreeing: int, threshold: int, tries: int, searched: bool) -> Detection:
    return Detection(model=owner if agreeing >= threshold else None, agreeing=agreeing,
                     threshold=threshold, p_value=min(1.0, p_value(agreeing) * tries), searched=searched)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """U (YUV), as float, of the picture's whole 8x8 blocks."""
    h, w = _whole(rgb)
    return rgb[:h, :w].astype(np.float64) @ _U + 128.0


def _bits(u: np.ndarray, rolls: np.ndarray) -> np.ndarray:
    """For each payload shift in ``rolls``, the 64 payload bits the blocks of ``u`` (a U channel) say,
    each the majority of its blocks: (shifts, 64) bool."""
    low, _ = pywt.dwt2(u, "haar")
    s0 = np.linalg.svd(dctn(_blocks(low), axes=(-2, -1), norm="ortho"), compute_uv=False)[..., 0]
    votes = (np.mod(s0, SCALE) >= SCALE / 2).ravel()
    tile = _tile_index(*s0.shape).ravel()
    out = np.empty((len(rolls), BITS), dtype=bool)
    for r, roll in enumerate(rolls):
        index = roll[tile]  # the payload bit each block carries under this shift
        out[r] = np.bincount(index, votes, BITS) > np.bincount(index, minlength=BITS) / 2
    return out


def _whole(rgb: np.ndarray) -> tuple[int, int]:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    return rgb.shape[0] // PIXELS_PER_BLOCK * PIXELS_PER_BLOCK, rgb.shape[1] // PIXELS_PER_BLOCK * PIXELS_PER_BLOCK


def _blocks(band: np.ndarray) -> np.ndarray:
    """(2R, 2C)-sized band -> (R/2, C/2, 4, 4) blocks, row-major."""
    r, c = band.shape[0] // BLOCK, band.shape[1] // BLOCK
    return band.reshape(r, BLOCK, c, BLOCK).swapaxes(1, 2)


def _unblocks(blocks: np.ndarray) -> np.ndarray:
    r, c = blocks.shape[:2]
    return blocks.swapaxes(1, 2).reshape(r * BLOCK, c * BLOCK)


def _tile_index(rows: int, cols: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(rows) % TILE, np.arange(cols) % TILE, indexing="ij")
    return i * TILE + j


# _ROLLS[r]: the payload bit each tile position reads when the payload is shifted by r = 8 * rows + columns
_ROLLS = np.array([[((i + r // TILE) % TILE) * TILE + (j + r % TILE) % TILE for i in range(TILE) for j in range(TILE)]
                   for r in range(TILE * TILE)])


def _rgb_change(x: np.ndarray, du: np.ndarray) -> np.ndarray:
    """The least RGB change (per pixel) that moves U by ``du`` within [0, 255]: along U's gradient,
    then, for a channel that would leave the range, with it held at its bound and the others moving."""
    change = np.zeros_like(x)
    free = np.ones(x.shape, dtype=bool)
    for _ in range(3):  # each pass holds at least one more channel of every pixel still out of range
        g = _U * free
        rest = du - (change @ _U)
        norm = np.sum(g * g, axis=-1)
        step = np.divide(rest, norm, out=np.zeros_like(rest), where=norm > 1e-9)
        change += step[..., None] * g
        new = x + change
        out = (new < 0) | (new > 255)
        if not out.any():
            break
        change = np.clip(new, 0, 255) - x
        free &= ~out
    return change
