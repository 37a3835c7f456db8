"""Shared fixtures: live genserve processes on loopback ports, driven over HTTP.

Each e2e module talks to ``server`` and ``openai_client``; which models that server runs is the
module's choice (``SERVER_SET = "image"`` at its top; ``text`` if it says nothing), so running one
module starts only what it needs. One session server per set (``SERVER_SETS``):

- ``text``: the shipped text, embedding and moderation models and ``tiny-fp32`` (the text weights in
  float32);
- ``limits``: copies of the text model with tight limits (a queue of one, a deadline, a small KV
  cache), apart so that limit tests do not disturb the others;
- ``image``: the shipped image models, ``tiny-sd`` (a random Stable Diffusion pipeline the fixture
  saves), ``tiny-sd-flagged`` (the same, behind a random safety checker that flags every image) and
  ``genserve-mol``, for the image routes to refuse;
- ``audio``: the shipped speech and music models and ``tiny-vits`` (a random VITS);
- ``molecule``: the shipped molecule models;
- ``guard``: a guard model (family ``llama-guard``) and a text model whose policy asks it.

All the sets a session's tests use start together when the session starts (``server_sets``), and
each is shared by every module that names it. ``gateway`` is a second process whose models are
``remote`` entries pointing at the ``text`` server. A module whose ``server`` is its own says
``SERVER_SET = None``; one with a slow set-up of its own (a Ray cluster) names it ``START_EARLY``, which
the session runs in the background once the sets are up (:class:`Early`).

Servers keep the probe verdicts of :mod:`genserve.models.batch_invariance` in the user's cache, as a
deployment does, so their start does not repeat probes; in-process tests probe afresh, in a cache of
their own, so a verdict from an older probe cannot hide a regression.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from genserve.app.provenance.credentials import load_credentials
from genserve.models.batch_invariance import cache_dir

ROOT = Path(__file__).resolve().parent.parent
TEXT_DIR = ROOT / "src" / "genserve" / "models" / "weights" / "genserve-text-tiny"
API_KEY = "test-key-123"
TEXT = "genserve-text-tiny"
EMBED = "all-minilm-l6-v2"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One watermark key for the whole suite, so a seeded sampled output is the same in every session.
os.environ.setdefault("GENSERVE_WATERMARK_KEY", "genserve test suite")
# What servers make for themselves (the C2PA CA) goes to the session's own directory, never the user's.
if "GENSERVE_STATE_DIR" not in os.environ:
    os.environ["GENSERVE_STATE_DIR"] = tempfile.mkdtemp(prefix="genserve-state-")
    atexit.register(shutil.rmtree, os.environ["GENSERVE_STATE_DIR"], True)
# The private CA, made here once so that no server's log depends on whether it started first.
load_credentials(None, None, None, Path(os.environ["GENSERVE_STATE_DIR"]))
# Without a GPU the Triton kernels run in Triton's interpreter, which reads TRITON_INTERPRET when
# triton is first imported; diffusers imports triton, and tests in every directory import diffusers,
# so it is set here, before any test module is collected (tests/kernels/conftest.py explains more).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
SERVER_CACHE = cache_dir()  # read before the session fixture below points in-process tests elsewhere


@pytest.fixture(scope="session", autouse=True)
def fresh_probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """In-process tests keep probe verdicts in a cache of their own (module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("GENSERVE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(autouse=True)
def logging_state() -> Iterator[None]:
    """Each test leaves the process's logging as it found it: ``genserve serve`` run in-process (``main``)
    installs a root handler on the test's captured stderr, captures warnings and quiets libraries."""
    from genserve.app import logs

    root = logging.getLogger()
    handlers, level, filters = root.handlers[:], root.level, warnings.filters[:]
    levels = {name: logging.getLogger(name).level for name in logs.CHATTY}
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)
    warnings.filters[:] = filters
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


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


def content(data: bytes | str) -> bytes:
    """What a generated file shows or sounds (base64 or bytes): its pixels (every frame of a GIF) or its
    decoded samples. Two files of one seed differ in their C2PA manifests (each has its own time,
    instance id and signature); what they show must not."""
    import av
    from PIL import Image, ImageSequence

    raw = base64.b64decode(data) if isinstance(data, str) else data
    if raw.startswith((b"\x89PNG", b"GIF8", b"\xff\xd8\xff")) or raw[8:12] == b"WEBP":
        image = Image.open(io.BytesIO(raw))
        return repr(image.size).encode() + b"".join(f.convert("RGB").tobytes() for f in ImageSequence.Iterator(image))
    with av.open(io.BytesIO(raw)) as container:
        return b"".join(frame.to_ndarray().tobytes() for frame in container.decode(audio=0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(tmp: Path, name: str, registry: str, env: dict[str, str],
                  port: int | None = None) -> Server:
    """Starts a server process on ``registry`` and returns at once; :func:`wait_ready` waits for it."""
    config = tmp / f"{name}.yaml"
    config.write_text(registry)
    port, log = port or free_port(), tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "genserve", "serve", "--port", str(port), "--config", str(config)],
        env={**os.environ, "GENSERVE_API_KEYS": API_KEY, "GENSERVE_CACHE_DIR": str(SERVER_CACHE), **env},
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    return Server(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(server: Server, ready_path: str = "/health/ready", timeout: float = 180, kill: bool = True) -> Server:
    """Returns ``server`` once it answers ``ready_path``; raises if it exits, or after ``timeout`` (killing it
    first, unless ``kill`` is false)."""
    name, deadline = server.log.stem, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    if kill:
        server.proc.kill()
    raise RuntimeError(f"{name} not ready after {timeout}s:\n{server.log.read_text()[-3000:]}")


def start_server(tmp: Path, name: str, registry: str, env: dict[str, str], ready_path: str = "/health/ready",
                 timeout: float = 180, port: int | None = None) -> Server:
    return wait_ready(launch_server(tmp, name, registry, env, port), ready_path, timeout)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()


def build_tiny_vits(path: Path) -> Path:
    """A randomly initialised two-speaker VITS (16 kHz) and its character tokenizer, saved in ``path``
    as transformers saves them, so the real loading and generation path runs in tests."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    chars = list(" abcdefghijklmnopqrstuvwxyz'.,?!-")
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(["<pad>", *chars])}))
    tokenizer = VitsTokenizer(str(path / "vocab.json"), language=None, add_blank=True, normalize=True,
                              phonemize=False, pad_token="<pad>", unk_token="<pad>")
    torch.manual_seed(0)
    config = VitsConfig(vocab_size=len(chars) + 1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        ffn_dim=32, flow_size=16, spectrogram_bins=33, upsample_initial_channel=16,
                        upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16], resblock_kernel_sizes=[3],
                        resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=1,
                        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1,
                        duration_predictor_num_flows=1, duration_predictor_filter_channels=16,
                        depth_separable_num_layers=1, sampling_rate=16_000, num_speakers=2,
                        speaker_embedding_size=8)
    VitsModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_sd(path: Path) -> Path:
    """A randomly initialised Stable Diffusion pipeline (CLIP text encoder, 4-channel UNet, KL VAE:
    32x32 images from 8x8 latents) with a character-level CLIP tokenizer, saved as diffusers saves
    one, so the generic ``diffusers`` family runs its real loading and sampling path."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate([*chars, *(c + "</w>" for c in chars)])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae.config.scaling_factor = 1.0
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path / "sd", safe_serialization=True)
    return path / "sd"


def build_tiny_safety_checker(path: Path, threshold: float) -> Path:
    """A random diffusers ``StableDiffusionSafetyChecker`` (CLIP with 16 hidden units) and its image
    processor in ``path``, every concept threshold at ``threshold`` (-1: every image is flagged; 1:
    none is)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    model.save_pretrained(path / "safety_checker", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path / "feature_extractor")
    return path


def text_entry(mid: str, **extra: object) -> str:
    lines = [f"  - id: {mid}", "    modality: text", "    backend: local", "    family: llama",
             f"    source: {TEXT_DIR}"] + [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def builtin_entry(mid: str) -> str:
    """The built-in registry's entry ``mid`` as registry-file lines, its weights directory made absolute."""
    models = files("genserve.models")
    entry = next(e for e in yaml.safe_load(models.joinpath("registry.yaml").read_text())["models"] if e["id"] == mid)
    if "source" in entry and not entry["source"].startswith("package:"):
        entry["source"] = str(models.joinpath(entry["source"]))
    return textwrap.indent(yaml.safe_dump([entry], sort_keys=False), "  ")


def tiny_sd_entry(tmp: pytest.TempPathFactory) -> str:
    sd = build_tiny_sd(tmp.mktemp("tiny-sd"))
    checker = build_tiny_safety_checker(tmp.mktemp("flag-all-checker"), threshold=-1.0)
    return f"""  - id: tiny-sd-flagged
    modality: image
    backend: local
    family: diffusers
    source: {sd}
    device: cpu
    limits: {{max_n: 4, max_steps: 20}}
    moderation: {{image_checker: {checker}}}
  - id: tiny-sd
    modality: image
    backend: local
    family: diffusers
    source: {sd}
    tasks: [generation, edit]
    device: cpu
    max_batch_size: 4
    max_wait_ms: 50
    limits: {{max_n: 4, max_steps: 20, max_upload_bytes: 20000, max_upload_pixels: 4096}}
"""


def tiny_vits_entry(tmp: pytest.TempPathFactory) -> str:
    return f"""  - id: tiny-vits
    modality: audio
    backend: local
    family: transformers-tts
    source: {build_tiny_vits(tmp.mktemp("tiny-vits"))}
    device: cpu
    max_wait_ms: 20
"""


# The model sets e2e modules choose from (module docstring): each set's registry entries.
SERVER_SETS: dict[str, Callable[[pytest.TempPathFactory], list[str]]] = {
    "text": lambda _: [builtin_entry(TEXT), builtin_entry(EMBED), builtin_entry("genserve-moderation"),
                       text_entry("tiny-fp32", dtype="float32")],  # the shipped model as transformers computes it
    "limits": lambda _: [text_entry("tiny-queue1", max_waiting=1, max_batch_size=1,  # one sequence at a time
                                    moderation={"input": True, "semantic": False}),  # its 429s: before moderation
                         text_entry("tiny-deadline", request_timeout_s=0.3),
                         text_entry("tiny-disconnect"),
                         text_entry("tiny-smallkv", kv_cache_tokens=64, kv_block_size=16)],  # smaller than a context
    "image": lambda tmp: [*map(builtin_entry, ("genserve-diffusion", "genserve-gan", "genserve-vae", "genserve-flow",
                                               "genserve-mol")), tiny_sd_entry(tmp)],
    "audio": lambda tmp: [builtin_entry("genserve-speech"), builtin_entry("genserve-music"), tiny_vits_entry(tmp)],
    "molecule": lambda _: [builtin_entry("genserve-mol"), builtin_entry("genserve-mol-vae")],
    # a guard model (the text weights as family llama-guard) and a text model whose policy asks it
    "guard": lambda _: [f"""  - {{id: tiny-guard, modality: moderation, backend: local, family: llama-guard,
      source: {TEXT_DIR}}}
""", text_entry("guarded", moderation={"guard_model": "tiny-guard"})],
}


# Settings of a set's server beyond the defaults. The limit tests count tokens a client reads against
# tokens generated (disconnects, deadlines); moderation's hold-back keeps 48-72 characters from a client
# until they are checked, so those counts are taken with moderation off (test_moderation_*.py test it).
SERVER_SET_ENV: dict[str, dict[str, str]] = {"limits": {"GENSERVE_MODERATION": '{"enabled": false}'}}


def module_set(module: object) -> str | None:
    """The set a test module's ``server`` runs: its ``SERVER_SET``, else ``text`` (``None``: the module's
    ``server`` fixture is its own)."""
    name = getattr(module, "SERVER_SET", "text")
    if name is not None and name not in SERVER_SETS:
        raise ValueError(f"SERVER_SET of {module} must be one of {sorted(SERVER_SETS)}, got {name!r}")
    return name


def server_sets_of(item: pytest.Item) -> list[str]:
    """The sets ``item`` talks to: its module's ``server`` set, the gateway's upstream (``text``), and
    any the module fronts through a gateway of its own (``UPSTREAM_SETS``)."""
    module = getattr(item, "module", None)
    own = module_set(module) if "server" in item.fixturenames else None
    names = [own] if own else []
    names += ["text"] if "gateway" in item.fixturenames else []
    return names + list(getattr(module, "UPSTREAM_SETS", ()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A module with ``START_EARLY`` runs first in its directory: what it starts loads while the
    directories before it run, and is gone before its neighbours run (a Ray cluster's background work
    would disturb their timing)."""
    first: dict[Path, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.path.parent, i)
    items.sort(key=lambda item: (first[item.path.parent], not hasattr(getattr(item, "module", None), "START_EARLY")))


class Early:
    """A module's slow set-up (its ``START_EARLY``, a function of a temporary directory that returns what
    the module's fixtures use and a function that undoes it), run in a thread of its own so that it
    loads while other modules' tests run; it is given the environment as the session began (tests that set a
    variable for a moment may run meanwhile). ``result`` waits for it; ``stop`` has the thread undo it, in
    the background, and ``join`` waits for that. The thread lives until then: processes started with
    Ray's fate sharing (``PR_SET_PDEATHSIG``) die with the thread that started them."""

    def __init__(self, start: Callable[[Path, dict[str, str]], tuple[object, Callable[[], None]]], tmp: Path,
                 after: Callable[[], None]) -> None:
        env = dict(os.environ)  # as the session began: tests that change it for a moment do so meanwhile
        self.value: object = None
        self.error: BaseException | None = None
        self.done, self.stopping = threading.Event(), threading.Event()

        def run() -> None:
            try:
                after()
                if self.stopping.is_set():  # the session ended first
                    return
                self.value, undo = start(tmp, env)
            except BaseException as exc:
                self.error = exc
                return
            finally:
                self.done.set()
            self.stopping.wait()
            undo()

        self.thread = threading.Thread(target=run, name=f"early-{tmp.name}", daemon=True)
        self.thread.start()

    def result(self) -> object:
        self.done.wait()
        if self.error is not None:
            raise RuntimeError("the module's early set-up failed") from self.error
        return self.value

    def stop(self) -> None:
        self.stopping.set()

    def join(self) -> None:
        self.stop()
        self.thread.join()


class ServerSets:
    """The session's servers, one per model set, started at most once and stopped at the end, and the
    modules' early set-ups (:class:`Early`), begun once those servers are up."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.servers: dict[str, Server] = {}
        self.ready: set[str] = set()
        self.early: dict[str, Early] = {}

    def started(self, timeout: float = 300) -> None:
        """Returns when every launched server answers, has exited (its tests will say so) or ``timeout``
        has passed; it kills none (``get`` decides that)."""
        deadline = time.monotonic() + timeout
        for srv in list(self.servers.values()):
            with contextlib.suppress(RuntimeError):
                wait_ready(srv, timeout=max(0.0, deadline - time.monotonic()), kill=False)

    def start_early(self, module: object) -> None:
        name = getattr(module, "__name__", "")
        start = getattr(module, "START_EARLY", None)
        if start is not None and name not in self.early:
            self.early[name] = Early(start, self.tmp.mktemp(name.rpartition(".")[2]), self.started)

    def launch(self, name: str) -> None:
        if name not in self.servers:
            registry = "include_defaults: false\nmodels:\n" + "".join(SERVER_SETS[name](self.tmp))
            self.servers[name] = launch_server(self.tmp.mktemp(name), name, registry, SERVER_SET_ENV.get(name, {}))

    def get(self, name: str) -> Server:
        self.launch(name)
        if name not in self.ready:
            wait_ready(self.servers[name], timeout=240)  # loading beside the other sets
            self.ready.add(name)
        return self.servers[name]

    def stop(self) -> None:
        """All at once: each drains and exits on its own, so stopping them one by one adds up their times."""
        for srv in self.servers.values():
            srv.proc.terminate()
        for srv in self.servers.values():
            try:
                srv.proc.wait(15)
            except subprocess.TimeoutExpired:
                srv.proc.kill()
        for early in self.early.values():
            early.join()


@pytest.fixture(scope="session", autouse=True)
def server_sets(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerSets]:
    """Launches every set this session's tests use at once, when the session starts, in the order
    they are needed: on two cores one server loads while another waits on a child process, and tests
    run while the sets load. Modules' early set-ups (``START_EARLY``) begin once the sets are up."""
    sets = ServerSets(tmp_path_factory)
    for item in request.session.items:
        for name in server_sets_of(item):
            sets.launch(name)
    for item in request.session.items:
        sets.start_early(getattr(item, "module", None))
    yield sets
    sets.stop()


@pytest.fixture(scope="module")
def early(request: pytest.FixtureRequest, server_sets: ServerSets) -> Iterator[object]:
    """What the module's ``START_EARLY`` made (:class:`Early`); undone in the background after the module."""
    job = server_sets.early[request.module.__name__]
    yield job.result()
    job.stop()


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, server_sets: ServerSets) -> Server:
    """The server a test module talks to: the set named by the module's ``SERVER_SET``, else ``text``."""
    name = module_set(request.module)
    assert name is not None, "a module with SERVER_SET = None defines its own server fixture"
    return server_sets.get(name)


@pytest.fixture(scope="session")
def gateway(server_sets: ServerSets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    text_server = server_sets.get("text")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    registry = f"""include_defaults: false
models:
  - id: remote-text
    modality: text
    backend: remote
    url: {text_server.url}/v1
    upstream_model: {TEXT}
    api_key_env: TEST_UPSTREAM_KEY
  - id: remote-embed
    modality: embedding
    backend: remote
    url: {text_server.url}/v1
    upstream_model: {EMBED}
    api_key_env: TEST_UPSTREAM_KEY
  - id: remote-missing
    modality: text
    backend: remote
    url: {text_server.url}/v1
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


def sdk(url: str, api_key: str = API_KEY, timeout: float = 60, strict: bool = True):
    """The official OpenAI SDK on ``url``, validating every response against its own types
    (``_strict_response_validation``): what a strict client would refuse fails the test. ``strict=False``
    only where the SDK's types refuse what OpenAI's own API sends (said where it is used)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout,
                  _strict_response_validation=strict)


@pytest.fixture(scope="module")
def openai_client(server: Server):
    return sdk(server.url)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's, from make's test-system-deps) on a loopback port, without disk."""
    import shutil

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is missing; install it with: sudo apt-get install redis-server")
    port, tmp = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=(tmp / "redis.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"redis-server did not start: {(tmp / 'redis.log').read_text()}") from None
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)
