"""The watermark secret and the registry's ``watermark`` field."""

from __future__ import annotations

import concurrent.futures
import stat
from pathlib import Path

import pytest

from genserve.app.provenance.keys import KEY_FILE, watermark_secret
from genserve.app.registry import ConfigError, load_registry


def test_a_secret_is_made_once_kept_private_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    first = watermark_secret(None, state)
    assert len(first) == 64 and "made a watermark key" in caplog.text
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600
    caplog.clear()
    assert watermark_secret(None, state) == first and not caplog.text  # a restart keys as before
    assert watermark_secret("the operator's", state) == "the operator's"  # a configured one wins
    assert list(state.iterdir()) == [state / KEY_FILE]  # no temporary file left


def test_servers_starting_together_share_one_secret(tmp_path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        secrets = list(pool.map(lambda _: watermark_secret(None, tmp_path), range(32)))
    assert len(set(secrets)) == 1 and secrets[0]


def test_an_emptied_key_file_is_refused_not_used(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("\n")
    with pytest.raises(RuntimeError, match="empty"):
        watermark_secret(None, tmp_path)


@pytest.mark.parametrize("entry", [
    "{id: up, modality: text, backend: remote, url: 'http://127.0.0.1:9/v1', watermark: true}",
    "{id: emb, modality: embedding, backend: local, family: sentence-transformers, source: x, watermark: true}",
])
def test_watermark_true_where_genserve_cannot_mark_is_refused(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"include_defaults: false\nmodels:\n  - {entry}\n")
    with pytest.raises(ConfigError, match="watermark"):
        load_registry(path)


def test_the_watermark_is_on_for_the_shipped_text_model_and_can_be_turned_off(tmp_path: Path) -> None:
    assert {e.id: e.watermark for e in load_registry()}["genserve-text-tiny"] is True
    path = tmp_path / "r.yaml"
    path.write_text("models:\n  - {id: genserve-text-tiny, modality: text, backend: local, family: llama, "
                    "source: weights/genserve-text-tiny, watermark: false}\n")
    assert {e.id: e.watermark for e in load_registry(path)}["genserve-text-tiny"] is False
