"""The built wheel is one top-level package, ``genserve``, with its registry and weights, and it serves.

The wheel is built from this checkout and installed without dependencies into a fresh venv; the
dependencies come from the test's own environment through a path entry (not a site directory, so
the editable install's ``.pth`` of this checkout is not processed there). What the venv imports is
therefore exactly what the wheel installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the sdist would hold, so setuptools' build/ never lands in the checkout
    # (where a stale build/lib could leak deleted files into later wheels).
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=300, cwd=out)
    (built,) = out.glob("genserve-*.whl")
    return built


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=False)
    site = next((home / "lib").glob("python3*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(home / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-compile", str(wheel)], check=True, timeout=300)
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    yield home


def _run(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(home / "bin" / "python"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names}
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        declared = zf.read(top_level).decode().split()
    assert {t for t in top if not t.endswith(".dist-info")} == {"genserve"}
    assert declared == ["genserve"]
    # Package data: the built-in registry and every shipped model's weights.
    assert "genserve/models/registry.yaml" in names
    assert "genserve/models/weights/genserve-text-tiny/model.safetensors" in names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))]
    # The licence pyproject names travels with it.
    licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(licence) == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in (ROOT / "LICENSE").read_bytes()[:100]


def test_installed_wheel_imports_only_genserve(clean_venv: Path, tmp_path: Path) -> None:
    # Top-level app, models or kernels installed by the wheel (the venv's own site-packages). Others may
    # exist: transformers >= 5.25 depends on Hugging Face's `kernels` package, reached through the test
    # dependencies' path.
    probe = ("import importlib.util as u, genserve, sys; "
             "print(genserve.__file__); print([n for n in ('app', 'models', 'kernels') "
             "if (s := u.find_spec(n)) and (s.origin or '').startswith(sys.prefix)])")
    r = _run(clean_venv, "-c", probe, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path, importable = r.stdout.splitlines()
    assert str(clean_venv) in path and str(ROOT) not in path
    assert importable == "[]"
    version = _run(clean_venv, "-m", "genserve", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("genserve ")
    script = subprocess.run([str(clean_venv / "bin" / "genserve"), "--version"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert script.stdout == version.stdout


def test_python_m_genserve_serves_from_the_wheel(clean_venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "registry.yaml"
    config.write_text("include_defaults: false\nmodels:\n"
                      "  - {id: genserve-gan, modality: image, backend: local, family: gan,\n"
                      "     source: 'package:genserve.models/weights/genserve-gan',\n"
                      "     tasks: [generation, interpolation]}\n")
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([str(clean_venv / "bin" / "python"), "-m", "genserve", "serve", "--port", str(port),
                             "--config", str(config)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={"GENSERVE_API_KEYS": API_KEY, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                 "GENSERVE_STATE_DIR": str(tmp_path / "state")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        r = httpx.post(f"{url}/v1/images/generations", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "genserve-gan", "prompt": "7", "seed": 1}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["b64_json"]
    finally:
        proc.terminate()
        proc.wait(15)
