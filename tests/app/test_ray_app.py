"""What a registry entry's ``ray`` block becomes in Ray Serve's deployment options (app/ray_app.py); the
deployments themselves run on a real cluster in tests/e2e/test_ray.py."""

from __future__ import annotations

import pytest

from genserve.app.ray_app import deployment_name, local_cluster_cpus, model_options
from genserve.app.registry import ConfigError, ModelEntry, load_registry
from genserve.app.settings import Settings

pytest.importorskip("ray")


def entry(**extra: object) -> ModelEntry:
    return ModelEntry.model_validate({"id": "org/model:v1", "modality": "image", "backend": "local", "family": "gan",
                                      "source": "x", **extra})


def test_defaults_take_the_models_own_queue() -> None:
    opts = model_options(entry(max_batch_size=16, max_waiting=10), Settings(shutdown_grace_s=7))
    # A replica stopped by a downscale or an update may finish a request up to its deadline (300 s).
    assert opts == {"name": "model-org_model_v1", "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
                    "max_ongoing_requests": 26, "max_queued_requests": 10, "health_check_period_s": 5.0,
                    "graceful_shutdown_timeout_s": 300.0, "num_replicas": 1}
    short = model_options(entry(request_timeout_s=20), Settings(shutdown_grace_s=30))
    assert short["graceful_shutdown_timeout_s"] == 30


def test_autoscaling_and_resources_pass_through() -> None:
    ray = {"autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3,
                           "upscale_delay_s": 1, "downscale_delay_s": 20}, "num_cpus": 2, "num_gpus": 0.5,
           "max_ongoing_requests": 8, "max_queued_requests": 100, "max_replicas_per_node": 1,
           "max_surge_percent": 50}
    opts = model_options(entry(ray=ray), Settings())
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 0,
                                          "target_ongoing_requests": 3.0, "upscale_delay_s": 1.0,
                                          "downscale_delay_s": 20.0, "look_back_period_s": 30.0}
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"], opts["max_replicas_per_node"],
            opts["max_surge_percent"]) == (8, 100, 1, 50)


def test_ray_options_are_validated_and_the_options_ray_accepts() -> None:
    """Ray's own ``AutoscalingConfig`` and deployment options are what the options become; it accepts them."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig

    ray = {"autoscaling": {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 2}, "max_surge_percent": 100}
    opts = model_options(entry(ray=ray), Settings())
    AutoscalingConfig(**opts["autoscaling_config"])
    deployment = serve.deployment(**opts)(type("Replica", (), {}))
    assert deployment._deployment_config.max_surge_percent == 100
    for bad in (-1, 101):
        with pytest.raises(ValueError, match="max_surge_percent"):
            entry(ray={"max_surge_percent": bad})


def test_the_local_cluster_gets_the_cpus_the_deployments_reserve() -> None:
    entries = load_registry()  # the embedded models: 1 CPU each, plus the gateway's
    on_ray = [e for e in entries if e.runs_on_ray]
    assert local_cluster_cpus(entries, Settings()) >= len(on_ray) + 1
    assert all(not e.runs_on_ray for e in entries if e.modality == "moderation" or e.backend == "remote")


def test_two_ids_that_become_one_deployment_name_are_refused() -> None:
    from genserve.app.ray_app import application

    a, b = entry(id="a/b"), entry(id="a:b")
    assert deployment_name(a) == deployment_name(b)
    with pytest.raises(ConfigError, match="become the Ray deployment name 'model-a_b'"):
        application(Settings(), [a, b])


def test_the_serve_config_names_the_builder_and_ray_accepts_it() -> None:
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from genserve.app import ray_app

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    module, _, name = config.applications[0].import_path.partition(":")
    assert module == "genserve.app.ray_app" and getattr(ray_app, name) is ray_app.build


def test_the_builder_checks_its_args_and_keys(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from ray.serve.deployment import Application

    from genserve.app.ray_app import build

    monkeypatch.setenv("GENSERVE_STATE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="takes the args config and models, not model"):
        build({"model": "x"})
    # Ray's proxies bind the cluster config's address, whatever GENSERVE_HOST says: keys, or a refusal.
    with pytest.raises(ConfigError, match="refusing to serve on a Ray cluster's proxies without API keys"):
        build({})
    monkeypatch.setenv("GENSERVE_API_KEYS", "k1")
    assert isinstance(build({"models": "genserve-gan,genserve-text-tiny"}), Application)


def test_the_gateway_leaves_token_counts_to_replicas_whose_backend_meters_them() -> None:
    """A text model's replicas count tokens and finish reasons step by step and their series reach the
    gateway's /metrics, so the gateway counts them no more (a sum over the deployments counts each once);
    for other models the gateway counts what it sees, as in one process."""
    from genserve.app.backends.manager import build_backend
    from genserve.app.metrics import Metrics

    text = ModelEntry.model_validate({"id": "t", "modality": "text", "backend": "local", "family": "llama",
                                      "source": "x"})
    assert build_backend(text, Settings(), Metrics(), handle=object()).meters_tokens
    assert not build_backend(entry(), Settings(), Metrics(), handle=object()).meters_tokens
