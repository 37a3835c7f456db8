"""Batch invariance: a row's result must not depend on the other rows of its batch.

oneDNN, MKL and cuBLAS choose kernels by shape. A convolution over an 8×8 map, or a linear layer
over a handful of rows, sums in another order for a batch of one than for a batch of four, so the
last bits of a row change with its neighbours. Over tens of denoising steps that flips pixels, and
a seeded request would not give the same PNG alone and batched.

``make_batch_invariant(model, probe)`` finds the layers that do this on the machine it runs on and
makes only those run row by row. ``probe(n)`` runs the model once on a batch of ``n`` rows (made
with any fixed inputs) and returns its output; the first run records the input of every leaf
layer, then each layer is run on its recorded input in a spread of batch sizes up to ``max_rows``
(``probe_sizes``) and its first and last rows compared, bit for bit, with those rows run alone.
A layer that differs gets a forward that runs its rows one at a time, which is exactly what it
computes for a batch of one. Everything else keeps its batched kernels. A last end-to-end check
compares whole-model rows alone and in batches; if they still differ (an op outside the probed
layers), the caller is told, and must not batch the model.

A probe runs the model about 160 rows' worth (5 s for genserve-diffusion's UNet on an idle 2-core
CPU, most of a minute on a busy one) and gives the same verdict at every start on the same machine
with the same weights, so the verdict (the layers to run row by row, and whether that suffices) is
kept on disk, one JSON file per key, in ``$GENSERVE_CACHE_DIR/batch-invariance`` (default
``$XDG_CACHE_HOME/genserve``, else ``~/.cache/genserve``). The key (:func:`probe_key`) holds all
that decides the verdict: the CPU (model, flags, the kernel set torch picked) or the CUDA device,
torch's version and thread count, the model's class, dtype, device and a digest of its weights,
``max_rows``, and a digest of what the probe computes for its first row alone, so a change to the
caller's probe inputs (shapes, seeds) is a new key too. A hit wraps exactly the layers a fresh probe
wrapped. A file that cannot be read or does not match its key is ignored and rewritten; it is JSON,
never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the probe's method changes, so older verdicts are not trusted

PROBED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.GroupNorm, nn.LayerNorm)


def run_rows_alone(module: nn.Module) -> None:
    """``module`` computes each row of its first argument as a batch of one (same results, alone
    or batched), then concatenates them."""
    batched = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dim() == 0 or x.shape[0] <= 1:
            return batched(x, *args, **kwargs)
        return torch.cat([batched(x[i:i + 1], *args, **kwargs) for i in range(x.shape[0])])

    module.forward = forward  # type: ignore[method-assign]


def probe_rows(n: int) -> slice:
    """The rows of the probe's fixed inputs that ``probe(n)`` runs: the first ``n`` for n > 0, row
    ``-n - 1`` alone for n < 0."""
    return slice(0, n) if n > 0 else slice(-n - 1, -n)


def probe_sizes(max_rows: int) -> list[int]:
    """Batch sizes a probe compares: the small ones, where kernels switch, and a spread above."""
    return sorted({n for n in (2, 3, 4, 5, 7, 8, 12, 16, max_rows - 1, max_rows) if 2 <= n <= max_rows})


def _varies(fn: Callable[[int], torch.Tensor], max_rows: int) -> bool:
    """Whether the first or last row of ``fn(n)`` differs from that row alone, ``fn(-k - 1)``."""
    alone: dict[int, torch.Tensor] = {}
    for n in probe_sizes(max_rows):
        out = fn(n)
        for k in (0, n - 1):
            if k not in alone:
                alone[k] = fn(-k - 1)[0]
            if not torch.equal(out[k], alone[k]):
                return True
    return False


@torch.no_grad()
def make_batch_invariant(model: nn.Module, probe: Callable[[int], torch.Tensor],
                         max_rows: int) -> tuple[list[str], bool]:
    """Makes ``model``'s batch-variant layers run row by row. ``probe(n)`` runs the model on the
    first ``n`` rows of fixed inputs, ``probe(-k - 1)`` on row ``k`` alone. Returns the wrapped
    layers' names, and whether whole-model rows are now the same alone and batched (if not, the
    caller must not batch this model). A verdict cached for the same key is applied without probing."""
    start = time.perf_counter()
    key = probe_key(model, probe, max_rows)
    path = cache_dir() / "batch-invariance" / f"{_digest(json.dumps(key, sort_keys=True).encode())}.json"
    cached = _read_verdict(path, key, model)
    if cached is not None:
        wrapped, invariant = cached
        for name in wrapped:
            run_rows_alone(model.get_submodule(name))
        log.info("batch-invariance probe cache hit for %s (%s): %d layers run row by row, rows %s; %.2f s",
                 type(model).__name__, path.name, len(wrapped), _said(invariant), time.perf_counter() - start)
        return wrapped, invariant
    wrapped, invariant = _probe(model, probe, max_rows)
    _write_verdict(path, key, wrapped, invariant)
    log.info("batch-invariance probe cache miss for %s (%s): probed in %.1f s", type(model).__name__, path.name,
             time.perf_counter() - start)
    return wrapped, invariant


def _said(invariant: bool) -> str:
    return "are the same alone and batched" if invariant else "STILL depend on their batch"


def _probe(model: nn.Module, probe: Callable[[int], torch.Tensor], max_rows: int) -> tuple[list[str], bool]:
    """The probe itself (the module docstring tells how): wraps the layers that vary, returns them
    and whether whole-model rows are then invariant."""
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:
            if name not in inputs and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 1:
                inputs[name] = args[0].detach().clone()
        return hook

    layers = {name: m for name, m in model.named_modules() if isinstance(m, PROBED)}
    hooks = [m.register_forward_hook(record(name)) for name, m in layers.items()]
    try:
        probe(max_rows)
    finally:
        for h in hooks:
            h.remove()
    wrapped = []
    for name, x in inputs.items():
        layer, rows = layers[name], x.shape[0]
        if rows < 2:
            continue

        def sliced(n: int, layer: nn.Module = layer, x: torch.Tensor = x) -> torch.Tensor:
            return layer(x[probe_rows(n)])

        if _varies(sliced, rows):
            run_rows_alone(layer)
            wrapped.append(name)
    invariant = not _varies(probe, max_rows)
    log.log(logging.INFO if invariant else logging.WARNING, "%s: %d of %d layers run row by row; rows %s",
            type(model).__name__, len(wrapped), len(layers), _said(invariant))
    return wrapped, invariant


def cache_dir() -> Path:
    """Where genserve keeps what it can recompute: ``$GENSERVE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/genserve``, else ``~/.cache/genserve``."""
    if os.environ.get("GENSERVE_CACHE_DIR"):
        return Path(os.environ["GENSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genserve"


def probe_key(model: nn.Module, probe: Callable[[int], torch.Tensor], max_rows: int) -> dict[str, Any]:
    """Everything a probe's verdict depends on (see the module docstring). Runs ``probe(-1)``: one row."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return {
        "version": CACHE_VERSION,
        "machine": _machine(str(device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": str(param.dtype) if param is not None else None,
        "device": str(device),
        "weights": weights_digest(model),
        "max_rows": max_rows,
        "probe": _digest(_tensor_bytes(probe(-1))),
    }


@cache
def _machine(device: str) -> dict[str, Any]:
    """What decides which kernels run: the CPU (model name, flags, the kernel set torch chose) and,
    for CUDA, the device and its libraries."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(),
                            "capability": torch.backends.cpu.get_cpu_capability()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        info["cpu"] = fields.get("model name", info["cpu"])
        info["flags"] = _digest(" ".join(sorted(fields.get("flags", "").split())).encode())
    if device.startswith("cuda"):
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        info |= {"cuda_device": torch.cuda.get_device_name(index),
                 "cuda_capability": list(torch.cuda.get_device_capability(index)),
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return info


def weights_digest(model: nn.Module) -> str:
    """A digest of ``model``'s state dict: every tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read_verdict(path: Path, key: dict[str, Any], model: nn.Module) -> tuple[list[str], bool] | None:
    """The verdict cached at ``path`` for ``key``, or None if there is none or it cannot be trusted
    (unreadable, another key, a layer ``model`` does not have)."""
    try:
        entry = json.loads(path.read_text())
        wrapped, invariant = entry["wrapped"], entry["invariant"]
        layers = dict(model.named_modules())
        if (entry["key"] == key and isinstance(invariant, bool) and isinstance(wrapped, list)
                and all(isinstance(name, str) and name in layers for name in wrapped)):
            return wrapped, invariant
        log.warning("ignoring batch-invariance cache file %s: it does not match this model", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable batch-invariance cache file %s (%s)", path, exc)
    return None


def _write_verdict(path: Path, key: dict[str, Any], wrapped: list[str], invariant: bool) -> None:
    """Writes the verdict through a temporary file and a rename, so a reader never sees half a file.
    A cache that cannot be written costs the next start a probe, nothing more."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            json.dump({"key": key, "wrapped": wrapped, "invariant": invariant}, f, indent=1)
        os.chmod(tmp, 0o644)  # as a plain write would leave it, not the temporary file's 0600
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the batch-invariance cache file %s (%s)", path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
