"""Offline checks of the Kubernetes manifests (deploy/kubernetes/, docs/deploy.md "Kubernetes"): no cluster, no network.

* every overlay renders with ``kubectl kustomize`` (kubectl 1.20's kustomize v2.0.3, Debian's
  ``kubernetes-client``, as well as current ones: the kustomizations keep to the keys v2.0.3 knows);
* the core kinds validate with ``kubernetes-validate --strict`` for each supported Kubernetes version;
* the custom resources (KubeRay's RayService, the Prometheus Operator's ServiceMonitor) validate with
  ``check-jsonschema`` against the CRD schemas pinned in deploy/schemas/ (made strict: unknown fields fail);
* genserve's own rules: the Ray version of every image and of ``rayVersion`` is pyproject's pin, a GPU worker
  group's ``nvidia.com/gpu`` equals its ``num-gpus``, the head takes no CPUs, ``serveConfigV2`` is the
  application of deploy/ray/serve.yaml and Ray's own ``ServeDeploySchema`` accepts it, every container runs as
  non-root, the gateway's probes are /health/live and /health/ready, and the pieces point at each other
  (Services, selectors, the registry's vLLM URL and served model name, secrets).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
SCHEMAS = ROOT / "deploy" / "schemas"
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
RAY_DOCKERFILE = KUBE / "ray-image" / "Dockerfile"
OVERLAYS = ("gateway", "gateway-external-vllm", "ray", "ray-gcs-ft")
# The Kubernetes versions the manifests are validated for (docs/deploy.md, deploy/kubernetes/README.md).
K8S_VERSIONS = ("1.30.0", "1.34.0")
# apiVersion/kind -> the pinned schema of that custom resource.
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): SCHEMAS / "ray.io_rayservice_v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "monitoring.coreos.com_servicemonitor_v1.json",
}
# What kustomize v2.0.3 (kubectl 1.20) understands; newer keys would not render there.
KUSTOMIZE_V2_KEYS = {"resources", "bases", "patchesStrategicMerge", "images", "namespace", "commonLabels"}
GPU = "nvidia.com/gpu"

Doc = dict[str, Any]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH to render the kustomizations: install Debian's kubernetes-client "
                    "(make test-system-deps) or any kubectl >= 1.20")
    return kubectl


_rendered: dict[str, list[Doc]] = {}


def render(overlay: str) -> list[Doc]:
    if overlay not in _rendered:
        out = subprocess.run([_kubectl(), "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
        _rendered[overlay] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _rendered[overlay]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(where, pod spec) of every pod template: Deployments' and a RayService's head and worker groups."""
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield name, d["spec"]["template"]["spec"]
        elif d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster.get("workerGroupSpecs", []):
                yield f"{name} worker group {group['groupName']}", group["template"]["spec"]


def containers(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    for where, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where} container {c['name']}", spec, c


def ray_version() -> str:
    m = re.search(r'"ray\[serve\]==([0-9][0-9.]*)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins no ray[serve]== version"
    return m.group(1)


# ------------------------------------------------------------------------------------------------ rendering


def test_kustomizations_keep_to_kustomize_v2_syntax() -> None:
    files = sorted(KUBE.rglob("kustomization.yaml"))
    assert len(files) >= 4
    for f in files:
        keys = set(yaml.safe_load(f.read_text()))
        newer = keys - KUSTOMIZE_V2_KEYS
        assert not newer, f"{f.relative_to(ROOT)}: {newer} needs a kustomize newer than kubectl 1.20's v2.0.3"
    assert {p.name for p in (KUBE / "overlays").iterdir()} == set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "genserve", f"{d['kind']}/{d['metadata']['name']}"
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "genserve"


# ------------------------------------------------------------------------------------------------ schemas


def _core(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_validate_strictly(overlay: str, version: str) -> None:
    import kubernetes_validate

    docs = _core(render(overlay))
    assert docs
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {d['kind']}/{d['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{e.message}")


def test_kubernetes_validate_strict_rejects_an_unknown_field() -> None:
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(render("gateway"), "Deployment", "genserve")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def _schema(path: Path) -> Doc:
    if not path.is_file():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: extract it from the CRD with "
                    "deploy/schemas/extract_crd_schema.py (deploy/kubernetes/README.md)")
    return json.loads(path.read_text())


def _check_jsonschema(schema: Path, docs: list[Doc], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    files = []
    for i, d in enumerate(docs):
        f = tmp_path / f"{d['kind']}-{d['metadata']['name']}-{i}.json"
        f.write_text(json.dumps(d))
        files.append(str(f))
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), *files],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("schema", sorted(CRD_SCHEMAS.values()), ids=lambda p: p.name)
def test_pinned_schemas_say_where_they_come_from(schema: Path) -> None:
    doc = _schema(schema)
    assert re.match(r"https://github\.com/\S+ \S+\.yaml at tag v[0-9.]+ \(commit [0-9a-f]{40}\)$", doc["x-source"])
    assert doc["x-license"] == "Apache-2.0"
    # Made strict: a misspelt field fails instead of being pruned silently by the API server.
    assert doc["properties"]["spec"]["additionalProperties"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_pinned_crds(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    checked = 0
    for (api_version, kind), schema in CRD_SCHEMAS.items():
        crs = [d for d in docs if d["apiVersion"] == api_version and d["kind"] == kind]
        if not crs:
            continue
        _schema(schema)
        out = _check_jsonschema(schema, crs, tmp_path)
        assert out.returncode == 0, f"{overlay}: {kind} against {schema.name}:\n{out.stdout}{out.stderr}"
        checked += len(crs)
    assert checked, f"{overlay} has no custom resource to check"
    # Every kind is validated by one of the two.
    for d in docs:
        if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS:
            assert "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].split("/")[0].endswith("k8s.io"), \
                f"{d['apiVersion']} {d['kind']}: a custom resource without a pinned schema"


def test_pinned_rayservice_schema_rejects_a_misspelt_field(tmp_path: Path) -> None:
    rs = json.loads(json.dumps(one(render("ray"), "RayService")))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    out = _check_jsonschema(CRD_SCHEMAS[("ray.io/v1", "RayService")], [rs], tmp_path)
    assert out.returncode != 0 and "rayStartParam" in out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------ Ray


def _rayservice(overlay: str = "ray") -> Doc:
    return one(render(overlay), "RayService", "genserve")


def gpu_group_errors(rayservice: Doc) -> list[str]:
    """Worker groups whose containers' nvidia.com/gpu limit differs from the num-gpus Ray is told."""
    errors = []
    for group in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        limits = sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0))
                     for c in group["template"]["spec"]["containers"])
        declared = group.get("rayStartParams", {}).get("num-gpus")
        if (limits or declared is not None) and str(limits) != str(declared):
            errors.append(f"{group['groupName']}: {GPU} limit {limits}, num-gpus {declared!r}")
    return errors


@pytest.mark.parametrize("overlay", ["ray", "ray-gcs-ft"])
def test_gpu_worker_groups_tell_ray_the_gpus_they_have(overlay: str) -> None:
    rs = _rayservice(overlay)
    assert gpu_group_errors(rs) == []
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if "num-gpus" in g.get("rayStartParams", {})]
    assert gpu_groups and len(gpu_groups) < len(groups), "a CPU and a GPU worker group"
    for g in gpu_groups:
        spec = g["template"]["spec"]
        assert any(t["key"] == GPU and t["operator"] == "Exists" for t in spec["tolerations"])
        for c in spec["containers"]:
            assert c["resources"]["requests"][GPU] == c["resources"]["limits"][GPU]


def test_gpu_check_catches_a_mismatch() -> None:
    rs = json.loads(json.dumps(_rayservice()))
    gpu = next(g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"])
    gpu["rayStartParams"]["num-gpus"] = "2"
    assert gpu_group_errors(rs)


def test_ray_images_and_version_match_the_pinned_ray() -> None:
    version = ray_version()
    rs = _rayservice()
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == version
    texts = [yaml.safe_dump(d) for o in ("ray", "ray-gcs-ft") for d in render(o)] + [RAY_DOCKERFILE.read_text()]
    tags = [t for text in texts for t in re.findall(r"rayproject/ray(?:-ml)?:([\w.-]+)", text)]
    assert tags, "the Ray image's Dockerfile builds on rayproject/ray"
    for tag in tags:
        assert tag == version or tag.startswith(version + "-"), f"rayproject/ray:{tag} is not Ray {version}"
    # The Ray pods run the image that Dockerfile builds (with genserve and Ray), not genserve's own image.
    images = {c["image"] for _, _, c in containers(render("ray"))}
    assert images and all(i.startswith("ghcr.io/genserve/genserve-ray:") for i in images), images


def test_head_takes_no_replicas() -> None:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    params = cluster["headGroupSpec"]["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["dashboard-host"] == "0.0.0.0"
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    assert _rayservice()["spec"]["upgradeStrategy"]["type"] == "NewCluster"


def test_serve_config_is_the_repository_application() -> None:
    from ray.serve.schema import ServeDeploySchema

    text = _rayservice()["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is YAML text"
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    ours = yaml.safe_load(SERVE_YAML.read_text())
    for key in ("proxy_location", "http_options"):
        assert config[key] == ours[key], key
    (app,) = config["applications"]
    (want,) = ours["applications"]
    assert app["import_path"] == "genserve.app.ray_app:build"
    for key in ("name", "route_prefix", "import_path", "args"):
        assert app[key] == want[key], key
    # Keys never travel in the config: they come from the pods' environment.
    assert not {k for k in app["runtime_env"]["env_vars"] if re.search("KEY|CERT", k)}


def test_serve_deploy_schema_rejects_a_broken_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    config["applications"][0]["import_path"] = "genserve"
    with pytest.raises(ValueError, match="import_path"):
        ServeDeploySchema.model_validate(config)


def test_gcs_fault_tolerance_points_at_its_redis() -> None:
    docs = render("ray-gcs-ft")
    ft = _rayservice("ray-gcs-ft")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].split(":")
    service = one(docs, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in one(docs, "Secret", ref["name"])["stringData"]
    assert one(docs, "Deployment", "redis")
    assert "gcsFaultToleranceOptions" not in _rayservice("ray")["spec"]["rayClusterConfig"]


# ------------------------------------------------------------------------------------------------ every pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_containers_run_as_non_root(overlay: str) -> None:
    for where, spec, c in containers(render(overlay)):
        pod, ctr = spec.get("securityContext", {}), c.get("securityContext", {})
        assert ctr.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
        assert ctr.get("runAsUser", pod.get("runAsUser", 0)) != 0, where
        assert ctr.get("allowPrivilegeEscalation") is False, where
        assert ctr.get("capabilities", {}).get("drop") == ["ALL"], where
        assert c.get("resources", {}).get("requests"), f"{where}: no resource requests"
    rs = [d for d in render(overlay) if d["kind"] == "RayService"]
    for d in rs:
        sc = d["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_genserve_secrets_are_mounted_not_inlined(overlay: str) -> None:
    docs = render(overlay)
    genserve = [(w, s, c) for w, s, c in containers(docs) if "genserve" in c["image"]]
    assert genserve
    for where, spec, c in genserve:
        env = {e["name"]: e for e in c["env"]}
        assert "GENSERVE_API_KEYS" not in env, where
        keys_file = Path(env["GENSERVE_API_KEYS_FILE"]["value"])
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(keys_file.parent))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        secret = one(docs, "Secret", volume["secret"]["secretName"])
        assert keys_file.name in secret["stringData"], where
        ref = env["GENSERVE_WATERMARK_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in one(docs, "Secret", ref["name"])["stringData"], where


# ------------------------------------------------------------------------------------------------ gateway


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", ["gateway", "gateway-external-vllm"])
def test_gateway_deployment(overlay: str) -> None:
    docs = render(overlay)
    dep = one(docs, "Deployment", "genserve")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["image"].startswith("genserve:")
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/var/lib/genserve"} <= mounts
    port = next(p for p in c["ports"] if p["containerPort"] == 8000)
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                        ("startupProbe", "/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in (8000, port["name"]), probe
    labels = pod["metadata"]["labels"]
    assert _selects(dep["spec"]["selector"]["matchLabels"], labels)

    service = one(docs, "Service", "genserve")
    assert _selects(service["spec"]["selector"], labels)
    (sport,) = service["spec"]["ports"]
    assert sport["port"] == 8000 and sport["targetPort"] in (8000, port["name"])

    hpa = one(docs, "HorizontalPodAutoscaler", "genserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "genserve"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2

    pdb = one(docs, "PodDisruptionBudget", "genserve")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)

    monitor = one(docs, "ServiceMonitor", "genserve")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == sport["name"]

    policy = one(docs, "NetworkPolicy", "genserve")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [8000]
    sources = [s for rule in policy["spec"]["ingress"] for s in rule["from"]]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in sources


def _registry(docs: list[Doc]) -> list[Doc]:
    from genserve.app.registry import ModelEntry

    dep = one(docs, "Deployment", "genserve")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    config = Path(next(e["value"] for e in c["env"] if e["name"] == "GENSERVE_CONFIG"))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(config.parent))
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    entries = yaml.safe_load(configmap["data"][config.name])["models"]
    for entry in entries:
        ModelEntry.model_validate(entry)
    return entries


def test_gateway_reaches_the_vllm_in_the_cluster() -> None:
    docs = render("gateway")
    (entry,) = [e for e in _registry(docs) if e["backend"] == "remote"]
    assert entry["modality"] == "text" and entry["url"] == "http://vllm:8000/v1"
    service = one(docs, "Service", "vllm")
    assert 8000 in {p["port"] for p in service["spec"]["ports"]}
    vllm = one(docs, "Deployment", "vllm")
    assert _selects(service["spec"]["selector"], vllm["spec"]["template"]["metadata"]["labels"])
    (c,) = vllm["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "vllm/vllm-openai:v0.11.0"
    assert c["args"][c["args"].index("--served-model-name") + 1] == entry["upstream_model"]
    assert c["resources"]["limits"][GPU] == 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    tolerations = vllm["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == GPU for t in tolerations)
    # vLLM checks no keys: only the gateway (and Prometheus) may reach it.
    policy = one(docs, "NetworkPolicy", "vllm")
    gateway_labels = one(docs, "Deployment", "genserve")["spec"]["template"]["metadata"]["labels"]
    assert any(_selects(s.get("podSelector", {}).get("matchLabels", {"-": "-"}), gateway_labels)
               for rule in policy["spec"]["ingress"] for s in rule["from"])


def test_external_vllm_overlay_uses_the_pool_instead() -> None:
    docs = render("gateway-external-vllm")
    (entry,) = [e for e in _registry(docs) if e["backend"] == "remote"]
    assert entry["url"] != "http://vllm:8000/v1" and entry["url"].endswith("/v1")
    assert not [d for d in docs if d["metadata"]["name"].startswith("vllm")]
