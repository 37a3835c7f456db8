"""``genserve serve --models a,b`` serves part of the registry; ``genserve serve --model DIR [--id NAME]``
serves one model alone, its family recognised from the files in its directory (as ``vllm serve MODEL``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from genserve.app.registry import ConfigError, ModelEntry, entry_for_source, load_registry, recognise, select
from genserve.cli import main
from tests.conftest import TEXT, TEXT_DIR, build_tiny_vits

WEIGHTS = TEXT_DIR.parent


@pytest.fixture(autouse=True)
def _no_registry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GENSERVE_MODELS", "GENSERVE_CONFIG", "GENSERVE_API_KEYS", "GENSERVE_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)


def served_entries(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[ModelEntry]:
    """The entries ``genserve serve ARGV`` would build its app on (nothing is loaded or served)."""
    import genserve.app.main

    class Built(Exception):
        pass

    def capture(settings: object, entries: list[ModelEntry]) -> None:
        raise Built(entries)

    monkeypatch.setattr(genserve.app.main, "create_app", capture)
    with pytest.raises(Built) as info:
        main(["serve", *argv])
    return info.value.args[0]


def test_every_shipped_directory_is_recognised_as_the_builtin_registry_serves_it() -> None:
    for builtin in load_registry():
        if builtin.resolved_source is None:  # genserve-moderation: no weights
            continue
        entry = entry_for_source(str(builtin.resolved_source))
        assert (entry.family, entry.modality) == (builtin.family, builtin.modality), builtin.id
        assert entry.id == builtin.resolved_source.name and entry.resolved_source == builtin.resolved_source
        if builtin.family == "diffusers":
            assert entry.tasks == builtin.tasks == ["generation", "edit"]  # genserve's pipeline inpaints


def write_json(path: Path, name: str, data: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data))
    return path


def test_tiny_directories_are_recognised_by_their_files(tmp_path: Path) -> None:
    (tmp_path / "vits").mkdir()
    vits = entry_for_source(str(build_tiny_vits(tmp_path / "vits")))
    assert (vits.id, vits.family, vits.modality, vits.tasks) == ("vits", "transformers-tts", "audio", ["speech"])
    llama = write_json(tmp_path / "llama", "config.json", {"architectures": ["LlamaForCausalLM"]})
    assert recognise(llama) == ("llama", [])
    (llama / "training_set.safetensors").write_bytes(b"")  # a SELFIES generator's novelty set
    assert recognise(llama) == ("selfies-llama", [])
    st = write_json(tmp_path / "st", "modules.json", [])
    write_json(st, "config.json", {"model_type": "bert"})
    assert recognise(st) == ("sentence-transformers", [])
    for model_type, family in [("gan", "gan"), ("genserve-vae", "image-vae"), ("genserve-mol-vae", "mol-vae")]:
        assert recognise(write_json(tmp_path / model_type, "config.json", {"model_type": model_type})) == (family, [])
    assert recognise(write_json(tmp_path / "speech", "config.json", {"family": "espeak-ng"})) == ("espeak-ng", [])
    # a pipeline from elsewhere edits when diffusers has an inpainting or image-to-image form of it
    sd = write_json(tmp_path / "sd", "model_index.json", {"_class_name": "StableDiffusionPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"]})
    assert recognise(sd) == ("diffusers", ["generation", "edit"])
    ddpm = write_json(tmp_path / "ddpm", "model_index.json", {"_class_name": "DDPMPipeline"})
    assert entry_for_source(str(ddpm), "my-ddpm").model_dump(include={"id", "modality", "tasks"}) == {
        "id": "my-ddpm", "modality": "image", "tasks": ["generation"]}


def test_an_unrecognised_directory_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model_type 'digits-classifier'.*looked for model_index\.json.*--config"):
        entry_for_source(str(WEIGHTS / "digits-classifier"))
    with pytest.raises(ConfigError, match="cannot tell which model family serves"):
        entry_for_source(str(tmp_path))
    with pytest.raises(ConfigError, match="--model: directory not found"):
        entry_for_source(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="--model: 'no-such-org/no-such-model' is neither a directory nor a hub id"):
        entry_for_source("no-such-org/no-such-model")


def test_ids_must_be_valid(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--id: 'bad id' is not a valid model id: String should match"):
        entry_for_source(str(TEXT_DIR), "bad id")
    spaced = write_json(tmp_path / "my model", "config.json", {"model_type": "gan"})
    with pytest.raises(ConfigError, match=r"--id: 'my model' is not a valid model id \(the default.*name it with --id"):
        entry_for_source(str(spaced))
    assert entry_for_source(str(spaced), "gan-1").id == "gan-1"


def test_models_selects_part_of_the_registry(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    builtin = load_registry()
    assert [e.id for e in select(builtin, ["genserve-gan", TEXT])] == [TEXT, "genserve-gan"]  # registry order
    assert [e.id for e in served_entries(monkeypatch, ["--models", f"genserve-gan, {TEXT}"])] == [TEXT, "genserve-gan"]
    assert main(["serve", "--models", "genserve-gan,nope,nada"]) == 2
    err = capsys.readouterr().err
    assert "genserve: --models: unknown model ids 'nope', 'nada'; known: genserve-text-tiny, " in err
    monkeypatch.setenv("GENSERVE_MODELS", "genserve-flow")
    assert [e.id for e in served_entries(monkeypatch, [])] == ["genserve-flow"]
    monkeypatch.setenv("GENSERVE_MODELS", "nope")
    assert main(["serve"]) == 2 and "genserve: GENSERVE_MODELS: unknown model id 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--model", str(TEXT_DIR), "--models", TEXT], {}, "cannot be combined with --models"),
    (["--model", str(TEXT_DIR)], {"GENSERVE_MODELS": TEXT}, "cannot be combined with GENSERVE_MODELS"),
    (["--model", str(TEXT_DIR), "--config", __file__], {}, "cannot be combined with --config"),
    (["--id", "x"], {}, "--id names the model of --model"),
    (["--model", str(WEIGHTS / "emoji-classifier")], {}, "cannot tell which model family serves"),
])
def test_cli_refuses_what_model_cannot_do(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                          argv: list[str], env: dict, expected: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_serve_model_serves_that_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """``genserve serve --model DIR`` end to end, in process (a server process took 10 s to be ready, this
    about as long but shares the suite's imports): the CLI's app, its lifespan, the engine process."""
    import genserve.cli

    seen: dict[str, list[dict]] = {}

    def run(server: genserve.cli.DrainingServer) -> None:
        with TestClient(server.config.app) as client:
            deadline = time.monotonic() + 60
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "not ready after 60 s"
                time.sleep(0.1)
            seen["models"] = client.get("/v1/models").json()["data"]

    monkeypatch.setattr(genserve.cli.DrainingServer, "run", run)
    assert main(["serve", "--model", str(TEXT_DIR), "--id", "tiny"]) == 0
    assert [(m["id"], m["modality"], m["tasks"], m["ready"]) for m in seen["models"]] == [
        ("tiny", "text", ["completion", "chat"], True)]

