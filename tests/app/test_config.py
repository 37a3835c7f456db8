"""A malformed registry or setting stops start-up with a message naming the field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from genserve.app.registry import ConfigError, load_registry
from genserve.app.settings import Settings
from genserve.cli import main


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "registry.yaml"
    p.write_text(text)
    return p


GAN = "models:\n  - id: x\n    modality: image\n    backend: local\n    family: gan\n    source: " + str(
    Path(__file__).resolve().parents[2] / "src" / "genserve" / "models" / "weights" / "genserve-gan") + "\n"
BAD_REGISTRIES = [
    ("models:\n  - id: x\n    modality: text\n    backend: locl\n", "models[0] (id 'x').backend"),
    ("models:\n  - id: x\n    modality: texts\n    backend: local\n", "models[0] (id 'x').modality"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n", "a remote model needs 'url'"),
    ("models:\n  - id: x\n    modality: text\n    backend: local\n    family: llama\n", "needs 'source'"),
    ("models:\n  - id: x\n    modality: text\n    backend: local\n    family: llama\n    source: ./nowhere\n",
     "models[0] (id 'x').source: directory not found"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n    max_waiting: 0\n",
     "models[0] (id 'x').max_waiting"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n    batch: 3\n",
     "models[0] (id 'x').batch: Extra inputs are not permitted"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n"
     "  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n", "id 'x' appears twice"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n    quantization: int5\n",
     "models[0] (id 'x').quantization: Input should be 'none', 'int8' or 'int4'"),
    ("models:\n  - id: x\n    modality: image\n    backend: remote\n    url: http://h/v1\n    attention: flash\n",
     "models[0] (id 'x').attention: Input should be 'sdpa' or 'genserve'"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n    kv_cache_tokens: 8\n",
     "models[0] (id 'x').kv_cache_tokens: Input should be greater than or equal to 16"),
    ("models:\n  - id: x\n    modality: text\n    backend: remote\n    url: http://h/v1\n    ray: {replicas: 2}\n",
     "'ray' applies to local generation models"),
    (GAN + "    ray: {autoscaling: {min_replicas: 3, max_replicas: 2}}\n",
     "models[0] (id 'x').ray.autoscaling: Value error, min_replicas (3) is above max_replicas (2)"),
    (GAN + "    ray: {autoscaling: {min_replicas: 1}}\n",
     "models[0] (id 'x').ray.autoscaling.max_replicas: Field required"),
    (GAN + "    ray: {autoscaling: {max_replicas: 4, initial_replicas: 5}}\n", "initial_replicas (5) is outside"),
    (GAN + "    ray: {replica: 2}\n", "models[0] (id 'x').ray.replica: Extra inputs are not permitted"),
    (GAN + "    ray: {autoscaling: {max_replicas: 4, target_ongoing: 2}}\n",
     "ray.autoscaling.target_ongoing: Extra inputs are not permitted"),
    (GAN + "    ray: {replicas: 2, autoscaling: {max_replicas: 4}}\n", "give 'replicas' or 'autoscaling', not both"),
    (GAN + "    ray: {num_gpus: 1.5}\n", "num_gpus 1.5: above 1 GPU, Ray reserves whole GPUs only"),
    (GAN + "    ray: {replicas: 0}\n", "models[0] (id 'x').ray.replicas: Input should be greater than or equal to 1"),
    ("models: [\n", "cannot read model registry"),
    ("- just a list\n", "the top level must be a mapping"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_REGISTRIES)
def test_bad_registry_names_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_registry(write(tmp_path, text))
    assert expected in str(info.value)


def test_user_registry_extends_replaces_and_overrides(tmp_path: Path) -> None:
    default_ids = [e.id for e in load_registry()]
    assert default_ids == ["genserve-text-tiny", "all-minilm-l6-v2", "genserve-mol", "genserve-mol-vae",
                           "genserve-diffusion", "genserve-gan", "genserve-vae", "genserve-flow", "genserve-speech",
                           "genserve-music", "genserve-moderation"]
    extra = "  - id: up\n    modality: text\n    backend: remote\n    url: http://h:8000/v1\n"
    assert [e.id for e in load_registry(write(tmp_path, "models:\n" + extra))] == [*default_ids, "up"]
    only = load_registry(write(tmp_path, "include_defaults: false\nmodels:\n" + extra))
    assert [e.id for e in only] == ["up"] and only[0].tasks == ["completion", "chat"]
    override = "models:\n  - id: genserve-text-tiny\n    modality: text\n    backend: remote\n    url: http://g/v1\n"
    entries = {e.id: e for e in load_registry(write(tmp_path, override))}
    assert entries["genserve-text-tiny"].backend == "remote"


def test_embedded_sources_resolve() -> None:
    for entry in load_registry():
        if entry.family == "genserve-moderation":  # classifiers from libraries: no weights directory
            assert entry.source is None
            continue
        assert entry.resolved_source is not None and entry.resolved_source.is_dir()


def test_cli_reports_bad_registry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--config", str(write(tmp_path, BAD_REGISTRIES[0][0]))]) == 2
    assert "models[0] (id 'x').backend" in capsys.readouterr().err


@pytest.mark.parametrize(("entry", "expected"), [
    ("    backend: local\n    family: nope\n    source: .\n",
     "model 'x': unknown family 'nope'; known: chorale, diffusers, espeak-ng, flow, gan, image-vae, llama"),
    ("    backend: local\n    family: sentence-transformers\n    source: .\n",
     "model 'x': family 'sentence-transformers' serves embedding, not text"),
    ("    backend: remote\n    url: http://h/v1\n    api_key_env: GENSERVE_TEST_UNSET_KEY\n",
     "api_key_env names GENSERVE_TEST_UNSET_KEY, which is not set"),
])
def test_cli_reports_backends_it_cannot_build(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, entry: str, expected: str) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("served a registry it cannot build"))
    registry = write(tmp_path, "include_defaults: false\nmodels:\n  - id: x\n    modality: text\n" + entry)
    assert main(["serve", "--config", str(registry)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"GENSERVE_PORT": "eighty"}, [], "GENSERVE_PORT"),
    ({}, ["--port", "70000"], "--port"),
    ({"GENSERVE_MAX_BODY_BYTES": "-1"}, [], "GENSERVE_MAX_BODY_BYTES"),
    ({}, ["--config", "/no/such/file.yaml"], "--config"),
    ({"GENSERVE_LOG_LEVEL": "loud"}, [], "GENSERVE_LOG_LEVEL"),
])
def test_cli_reports_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, env: dict,
                                 args: list, expected: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genserve: invalid setting") and expected in err


def test_public_bind_without_keys_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import uvicorn

    def must_not_serve(*args: object, **kwargs: object) -> None:
        raise AssertionError("started serving on a public address without keys")

    monkeypatch.setattr(uvicorn.Server, "run", must_not_serve)
    monkeypatch.delenv("GENSERVE_API_KEYS", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err
    monkeypatch.setenv("GENSERVE_API_KEYS", "k")
    with pytest.raises(AssertionError, match="started serving"):  # with a key it would serve
        main(["serve", "--host", "0.0.0.0"])


def test_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genserve.app.settings import Settings
    from genserve.app.tenancy import read_keys

    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk-file-1\n\n  k-file-2  \n")
    monkeypatch.setenv("GENSERVE_API_KEYS", "k1, k2,")
    s = Settings(api_keys_file=keys)
    assert [k.digest() for k in read_keys(s.api_keys, s.api_keys_file)] == [
        hashlib.sha256(k.encode()).digest() for k in ("k1", "k2", "k-file-1", "k-file-2")]
    assert Settings(host="::1").binds_loopback_only() and not Settings(host="0.0.0.0").binds_loopback_only()


def test_every_generative_modality_can_be_remote_and_others_are_refused_at_start():
    from genserve.app.backends.manager import build_backend
    from genserve.app.backends.remote import (
        RemoteAudioBackend,
        RemoteEmbeddingBackend,
        RemoteImageBackend,
        RemoteMoleculeBackend,
        RemoteTextBackend,
    )
    from genserve.app.metrics import Metrics
    from genserve.app.registry import ConfigError, ModelEntry
    from genserve.app.settings import Settings

    expected = {"text": RemoteTextBackend, "embedding": RemoteEmbeddingBackend, "image": RemoteImageBackend,
                "audio": RemoteAudioBackend, "molecule": RemoteMoleculeBackend}
    for modality, cls in expected.items():
        entry = ModelEntry(id=f"far-{modality}", modality=modality, backend="remote", url="http://gpu:8000/v1")
        assert type(build_backend(entry, Settings(), Metrics())) is cls
    # a remote moderation model is a guard model on an OpenAI-compatible server (family llama-guard)
    guard = ModelEntry(id="far-guard", modality="moderation", backend="remote", family="llama-guard",
                       url="http://gpu:8000/v1")
    assert type(build_backend(guard, Settings(), Metrics())).__name__ == "GuardModerationBackend"
    entry = ModelEntry(id="far-guard", modality="moderation", backend="remote", url="http://gpu:8000/v1")
    with pytest.raises(ConfigError, match=r"far-guard.*remote moderation model needs family 'llama-guard'"):
        build_backend(entry, Settings(), Metrics())


@pytest.mark.parametrize(("env", "base"), [
    ({}, "http://127.0.0.1:8000"),
    ({"GENSERVE_HOST": "0.0.0.0", "GENSERVE_PORT": "9000"}, "http://127.0.0.1:9000"),
    ({"GENSERVE_HOST": "::"}, "http://[::1]:8000"),
    ({"GENSERVE_HOST": "0.0.0.0", "GENSERVE_PUBLIC_URL": "https://api.example.com/genserve/"},
     "https://api.example.com/genserve"),
])
def test_the_base_url_of_image_links_comes_from_settings(monkeypatch: pytest.MonkeyPatch, env: dict, base: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings().base_url() == base


def test_a_public_url_must_be_an_http_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_PUBLIC_URL", "evil.example")
    with pytest.raises(ValidationError, match="public_url"):
        Settings()
