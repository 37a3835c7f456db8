"""Loading a family from a directory or from a hub id in the local Hugging Face cache (offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from genserve.models.common.loading import load_family, local_dir
from tests.conftest import TEXT_DIR


def fake_hub_cache(cache: Path, repo: str, files_from: Path) -> Path:
    """The cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<rev>/...}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_hub_id_loads_from_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    snapshot = fake_hub_cache(tmp_path, "genserve/text-tiny", TEXT_DIR)
    assert local_dir("genserve/text-tiny") == snapshot
    tm = load_family("llama", "genserve/text-tiny", "cpu", "float32")
    ids = tm.tokenizer("import os", return_tensors="pt").input_ids
    direct = load_family("llama", TEXT_DIR, "cpu", "float32")
    assert torch.equal(tm.model(ids), direct.model(ids))


def test_missing_hub_id_offline_names_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'someone/absent' is neither a directory nor a hub id"):
        local_dir("someone/absent")


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="unknown model family 'gpt9'"):
        load_family("gpt9", TEXT_DIR)
