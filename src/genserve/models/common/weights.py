"""The weights directory of our own networks: ``config.json`` (the config dataclass plus ``model_type``)
and ``model.safetensors``. Safetensors only: nothing is ever unpickled."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_net(net: nn.Module, model_type: str, out: Path) -> None:
    """``config.json`` (``net.config``, a dataclass, plus ``model_type``) and float32 ``model.safetensors``
    in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model_type": model_type, **asdict(net.config)}, indent=2) + "\n")
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def load_net(path: Path, config_cls: type, net_cls: type, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """The network saved by :func:`save_net` in directory ``path``, in eval mode."""
    path = Path(path)
    d = json.loads((path / "config.json").read_text())
    known = {f.name for f in fields(config_cls)}
    net = net_cls(config_cls(**{k: v for k, v in d.items() if k in known}))
    try:
        net.load_state_dict(load_file(str(path / "model.safetensors")))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match config.json: {e}") from None
    return net.to(device=device, dtype=dtype).eval()
