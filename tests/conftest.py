"""Shared fixtures: live genserve processes on loopback ports, driven over HTTP.

``server`` runs the embedded registry plus a few extra entries that reuse the shipped text
weights with tighter limits (so limit tests do not disturb the others); ``gateway`` is a second
process whose models are ``remote`` entries pointing at ``server``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_DIR = ROOT / "models" / "weights" / "genserve-text-tiny"
API_KEY = "test-key-123"
TEXT = "genserve-text-tiny"
EMBED = "all-minilm-l6-v2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, name: str, registry: str, env: dict[str, str], ready_path: str = "/health/ready",
                 timeout: float = 180) -> Server:
    config = tmp / f"{name}.yaml"
    config.write_text(registry)
    port, log = free_port(), tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--config", str(config)],
        env={**os.environ, "GENSERVE_API_KEYS": API_KEY, **env}, stdout=log.open("w"),
        stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{name} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()


def text_entry(mid: str, **extra: object) -> str:
    lines = [f"  - id: {mid}", "    modality: text", "    backend: local", "    family: llama",
             f"    source: {TEXT_DIR}"] + [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    registry = "models:\n" + "".join([
        text_entry("tiny-queue1", max_waiting=1, max_batch_size=1),  # one sequence at a time
        text_entry("tiny-deadline", request_timeout_s=0.3),
        text_entry("tiny-disconnect"),
        text_entry("tiny-fp32", dtype="float32"),  # the shipped model as transformers computes it by default
        text_entry("tiny-smallkv", kv_cache_tokens=64, kv_block_size=16),  # a cache smaller than the context
    ])
    srv = start_server(tmp_path_factory.mktemp("server"), "server", registry, {})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def gateway(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    registry = f"""include_defaults: false
models:
  - id: remote-text
    modality: text
    backend: remote
    url: {server.url}/v1
    upstream_model: {TEXT}
    api_key_env: TEST_UPSTREAM_KEY
  - id: remote-embed
    modality: embedding
    backend: remote
    url: {server.url}/v1
    upstream_model: {EMBED}
    api_key_env: TEST_UPSTREAM_KEY
  - id: remote-missing
    modality: text
    backend: remote
    url: {server.url}/v1
    upstream_model: no-such-model
    api_key_env: TEST_UPSTREAM_KEY
  - id: remote-dead
    modality: text
    backend: remote
    url: {dead}
"""
    gw = start_server(tmp_path_factory.mktemp("gateway"), "gateway", registry,
                      {"TEST_UPSTREAM_KEY": API_KEY}, ready_path="/health/live")
    yield gw
    stop_server(gw)


@pytest.fixture(scope="session")
def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
