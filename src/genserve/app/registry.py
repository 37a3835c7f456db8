"""The model registry: which models this process serves, and how.

The built-in registry (``models/registry.yaml``) serves the embedded models. A user's file
(``--config``) adds entries, replaces built-in entries with the same ``id``, or, with
``include_defaults: false``, replaces the built-in list entirely. Relative ``source`` paths are
resolved against the directory of the file that declares them; ``package:NAME/sub/dir`` points
inside an installed Python package; anything else that is not a directory is taken as a hub id.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from genserve.app.moderation.policy import PolicyPatch
from genserve.models.registry import FAMILIES, modality_tasks

Modality = Literal["text", "embedding", "image", "audio", "molecule", "moderation"]
MODERATION_TASKS = ["moderation"]  # moderation families live in app/moderation/backend.py
DEFAULT_REGISTRY = Path(str(resources.files("genserve.models") / "registry.yaml"))


class ConfigError(Exception):
    """A registry or setting that cannot be used; the message names the field."""


class Limits(BaseModel):
    """Per-request caps; a request beyond one gets a 400 naming the parameter."""

    model_config = ConfigDict(extra="forbid")
    max_n: int = Field(8, ge=1, le=128)
    max_prompts: int = Field(16, ge=1, description="prompts in one /v1/completions request")
    max_tokens: int | None = Field(None, ge=1, description="cap on generated tokens (context if unset)")
    max_top_logprobs: int = Field(20, ge=0, le=20)
    max_inputs: int = Field(2048, ge=1, description="inputs in one /v1/embeddings request")
    max_samples: int = Field(20_000, ge=1, description="molecule generators: strings sampled for one request "
                             "at most (the default and cap of its max_samples)")
    max_sampling_seconds: float = Field(60.0, gt=0, description="molecule generators: seconds one request may "
                                        "sample at most (the default and cap of its max_seconds); what was "
                                        "found by then is returned, with stats.stopped_by 'time'")
    max_image_pixels: int = Field(1024 * 1024, ge=1, description="images: width x height of one output image")
    max_steps: int = Field(150, ge=1, description="diffusion: num_inference_steps")
    max_upload_bytes: int = Field(8 << 20, ge=1, description="image edits: bytes of each uploaded file")
    max_upload_pixels: int = Field(2048 * 2048, ge=1, description="image edits: pixels of each uploaded image, "
                                   "checked from its header before it is decoded")
    max_input_chars: int = Field(4096, ge=1, description="speech: characters of input text")
    max_audio_seconds: float = Field(1200.0, gt=0, description="audio one request may produce; speech past it "
                                     "is cut off, music longer than it is refused")


class Autoscaling(BaseModel):
    """Ray Serve autoscaling of a model's replicas (``genserve serve --ray``): between ``min_replicas`` and
    ``max_replicas``, aiming at ``target_ongoing_requests`` per replica."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="0 lets an idle model scale to nothing (the first request "
                              "then waits for a replica to load)")
    max_replicas: int = Field(ge=1)
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy (default: min_replicas)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests running or queued in one replica "
                                           "that the autoscaler aims at")
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target this long removes replicas")
    look_back_period_s: float = Field(30.0, gt=0, description="the window the load is averaged over")

    @model_validator(mode="after")
    def _check_range(self) -> Autoscaling:
        # Checked here, at start and naming the field, rather than by Ray at deploy (which also takes
        # unknown keys without a word: extra='forbid' above).
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) is outside min_replicas..max_replicas "
                             f"({self.min_replicas}..{self.max_replicas})")
        return self


class RayOptions(BaseModel):
    """How a local model runs as a Ray Serve deployment under ``genserve serve --ray`` (ignored otherwise)."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1, description="fixed number of replicas (or autoscaling)")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each replica; fractions share one GPU")
    max_replicas_per_node: int | None = Field(None, ge=1, description="at most this many replicas on one node "
                                              "(1 spreads them, so a node's loss leaves the others)")
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests one replica runs or queues at "
                                             "once (default: the model's max_batch_size + max_waiting)")
    max_queued_requests: int | None = Field(None, ge=1, description="requests waiting for a replica beyond which "
                                            "new ones get 429 with Retry-After (default: the model's max_waiting)")
    max_surge_percent: int = Field(0, ge=0, le=100, description="extra replicas, in percent of the target "
                                   "count, a rolling update may start before it stops old ones (0: stop first)")

    @model_validator(mode="after")
    def _check(self) -> RayOptions:
        if "replicas" in self.model_fields_set and self.autoscaling is not None:
            raise ValueError("give 'replicas' or 'autoscaling', not both")
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"num_gpus {self.num_gpus}: above 1 GPU, Ray reserves whole GPUs only")
        return self


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    modality: Modality
    backend: Literal["local", "remote"]
    family: str | None = Field(None, description="models/ code that loads it (local backends)")
    source: str | None = Field(None, description="directory, package:NAME/path, or hub id")
    url: str | None = Field(None, pattern=r"^https?://", description="OpenAI-compatible base URL, e.g. "
                            "http://gpu-node:8000/v1 (remote backends)")
    upstream_model: str | None = Field(None, description="model name upstream (default: id)")
    api_key_env: str | None = Field(None, description="environment variable holding the upstream key")
    tasks: list[str] = Field(default_factory=list)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(8, ge=1, le=1024, description="largest batch: sequences per engine step "
                                "for text (default 64), items per model call otherwise (default 8)")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_waiting: int = Field(64, ge=1, description="queued requests beyond which new ones get 429")
    kv_cache_tokens: int | None = Field(None, ge=16, description="text engine: KV cache size in tokens over "
                                        "all sequences, allocated once (default: max_batch_size full contexts, "
                                        "at most 32768)")
    kv_block_size: int = Field(16, ge=1, le=256, description="text engine: tokens per KV cache block")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="text engine: prefill + decode tokens "
                                               "in one step (default: max(2048, context + max_batch_size))")
    threads: int | None = Field(None, ge=1, le=1024, description="text engine: CPU threads of its process "
                                "(default: all cores but one, which the HTTP side keeps)")
    quantization: Literal["none", "int8", "int4"] = Field("none", description="weight-only quantization of "
                                                          "the linear layers (text models)")
    compile: bool = Field(False, description="diffusers: torch.compile the denoiser at load")
    attention: Literal["sdpa", "genserve"] = Field("sdpa", description="diffusers: the attention of the denoiser: "
                                                   "PyTorch SDPA or genserve's Triton kernel (CUDA; CPU tensors "
                                                   "take SDPA either way)")
    watermark: bool = Field(True, description="local text and image models: watermark sampled texts and images "
                            "of 256x256 pixels or more (docs/provenance.md); other models carry no watermark")
    c2pa: bool = Field(True, description="images and audio of a local model: sign C2PA content credentials into "
                       "each file made whole (docs/provenance.md)")
    request_timeout_s: float | None = Field(None, gt=0, description="deadline (default: the setting)")
    limits: Limits = Field(default_factory=Limits)
    moderation: PolicyPatch | None = Field(None, description="this model's moderation policy, merged with the "
                                           "global one (GENSERVE_MODERATION): the stricter value of each field wins")
    ray: RayOptions = Field(default_factory=RayOptions, description="replicas and resources of the model's Ray "
                            "Serve deployment under genserve serve --ray (local models)")
    # Filled by the loader: the path the source resolved to, or None for a hub id / remote.
    resolved_source: Path | None = Field(None, exclude=True)

    @property
    def can_watermark(self) -> bool:
        """Whether genserve can watermark this model's output: text sampled by its own engine, images made
        here."""
        return self.modality in ("text", "image") and self.backend == "local"

    @property
    def runs_on_ray(self) -> bool:
        """Whether ``genserve serve --ray`` makes this model a Ray Serve deployment of its own (the others,
        remote models and moderation classifiers, run inside the gateway)."""
        return self.backend == "local" and self.modality != "moderation"

    def timeout_s(self, default: float) -> float:
        """This model's request deadline, or the process-wide ``default``."""
        return self.request_timeout_s or default

    def default_tasks(self) -> list[str]:
        """Its family's default tasks (models/registry.py); without a family (remote), its modality's."""
        if self.modality == "moderation":
            return list(MODERATION_TASKS)
        row = FAMILIES.get(self.family or "")
        return list(row.tasks if row is not None else modality_tasks(self.modality))

    @model_validator(mode="after")
    def _check_backend(self) -> ModelEntry:
        # genserve's own moderation classifiers are code and libraries: no weights to point at
        needs_source = not (self.modality == "moderation" and self.family == "genserve-moderation")
        if self.backend == "local" and (not self.family or (needs_source and not self.source)):
            missing = "family" if not self.family else "source"
            raise ValueError(f"a local model needs '{missing}'")
        if self.backend == "remote" and not self.url:
            raise ValueError("a remote model needs 'url'")
        if "ray" in self.model_fields_set and not self.runs_on_ray:
            raise ValueError("'ray' applies to local generation models: remote models and moderation classifiers "
                             "run in the gateway")
        if "watermark" in self.model_fields_set and self.watermark and not self.can_watermark:
            raise ValueError("'watermark: true' applies to local text and image models only: a remote model's "
                             "output cannot be watermarked by genserve, and other modalities have no watermark")
        if not self.tasks:
            self.tasks = self.default_tasks()
        if "max_batch_size" not in self.model_fields_set and self.modality == "text":
            self.max_batch_size = 64
        return self


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_defaults: bool = True
    models: list[ModelEntry] = Field(default_factory=list)


def field_path(loc: tuple, models: list | None = None) -> str:
    """A pydantic error's ``loc`` as the file writes it: ``models[2] (id 'x').limits.max_n``, ``keys[0].name``."""
    models = models or []
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            if out.startswith("models[") and out.count("[") == 1 and part < len(models):
                mid = models[part].get("id") if isinstance(models[part], dict) else None
                out += f" (id {mid!r})" if mid else ""
        else:
            out += f".{part}" if out else str(part)
    return out


def _read(path: Path) -> RegistryFile:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read model registry {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"model registry {path}: the top level must be a mapping with 'models'")
    try:
        reg = RegistryFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = field_path(tuple(err["loc"]), raw.get("models") or [])
        raise ConfigError(f"model registry {path}: {field or 'models'}: {err['msg']}") from exc
    for i, entry in enumerate(reg.models):
        if entry.backend == "local" and entry.source:
            entry.resolved_source = _resolve_source(entry.source or "", path.parent,
                                                    f"model registry {path}: models[{i}] (id {entry.id!r}).source")
    return reg


def _resolve_source(source: str, base: Path, where: str) -> Path | None:
    """The directory ``source`` names (relative to ``base``), or None for a hub id; ConfigError after
    ``where`` (what declared it) when it is neither."""
    if source.startswith("package:"):
        name, _, sub = source.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{where}: package {name!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base / path
    if path.is_dir():
        return path.resolve()
    if source.startswith(("package:", ".", "/", "~")) or source.count("/") != 1:
        raise ConfigError(f"{where}: directory not found: {path}")
    return None  # "org/name": a hub id, loaded by the family's loader (offline unless allowed)


def load_registry(path: Path | None = None) -> list[ModelEntry]:
    """The served models: the built-in registry, extended or replaced by ``path``."""
    user = _read(path) if path is not None else RegistryFile(include_defaults=True)
    entries = {e.id: e for e in _read(DEFAULT_REGISTRY).models} if user.include_defaults else {}
    if path is not None:
        ids = [e.id for e in user.models]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup:
            raise ConfigError(f"model registry {path}: id {dup!r} appears twice")
        entries.update({e.id: e for e in user.models})
    return list(entries.values())


def select(entries: list[ModelEntry], ids: list[str], where: str = "--models") -> list[ModelEntry]:
    """The entries whose id is in ``ids``, in registry order (``genserve serve --models``); ConfigError
    after ``where`` naming the unknown ids and listing the known ones."""
    known = [e.id for e in entries]
    unknown = [i for i in dict.fromkeys(ids) if i not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown model id{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return [e for e in entries if e.id in ids]


# What ``--model`` recognises a directory by: the files its family writes. genserve's own networks name
# themselves in config.json, by ``model_type`` (models/common/weights.py: the shipped weights' name, or the
# family's in ``make_tiny``; the molecule VAE its own) or by ``family`` (music, speech); transformers'
# TTS models by their ``model_type``.
MODEL_TYPES: dict[str, str] = {
    "genserve-gan": "gan", "gan": "gan", "genserve-vae": "image-vae", "image-vae": "image-vae",
    "genserve-flow": "flow", "flow": "flow", "genserve-mol-vae": "mol-vae",
    "vits": "transformers-tts", "bark": "transformers-tts", "musicgen": "transformers-tts",
}
SELFIES_TRAINING_SET = "training_set.safetensors"  # models/molecule/generator.py: a SELFIES generator's novelty set
LOOKED_FOR = ("model_index.json (diffusers); modules.json or config_sentence_transformers.json "
              "(sentence-transformers); config.json with model_type 'llama' or architecture LlamaForCausalLM "
              f"(llama; selfies-llama with {SELFIES_TRAINING_SET}), with model_type "
              f"{', '.join(repr(t) for t in MODEL_TYPES)}, or with 'family' naming a family")


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path} is not a JSON object")
    return data


def _diffusers_tasks(index: dict[str, Any]) -> list[str]:
    """``generation``, plus ``edit`` when the pipeline can edit: genserve's own inpaints and varies images
    itself (``GenserveEmojiPipeline``, as models/diffusion/loading.py tells it); another when diffusers has
    an inpainting or image-to-image pipeline for its class, the one the image runner derives at load
    (``AutoPipelineFor*.from_pipe``, models/diffusion/runner.py)."""
    name = index.get("_class_name")
    if name == "GenserveEmojiPipeline":
        return ["generation", "edit"]
    from diffusers.pipelines import auto_pipeline as auto  # seconds to import: only for other pipelines

    tables = (auto.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
              auto.AUTO_INPAINT_PIPELINES_MAPPING)
    kinds = {kind for table in tables for kind, cls in table.items() if cls.__name__ == name}
    edits = set(auto.AUTO_INPAINT_PIPELINES_MAPPING) | set(auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING)
    return ["generation", "edit"] if kinds & edits else ["generation"]


def recognise(path: Path, where: str = "--model") -> tuple[str, list[str]]:
    """The family of the model directory ``path`` and its tasks ([] for the family's defaults), from the
    files in it (:data:`LOOKED_FOR`); ConfigError after ``where`` when nothing there says."""
    if (path / "model_index.json").is_file():
        return "diffusers", _diffusers_tasks(_read_json(path / "model_index.json", where))
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return "sentence-transformers", []
    config = _read_json(path / "config.json", where) if (path / "config.json").is_file() else {}
    model_type, family = config.get("model_type"), config.get("family")
    if isinstance(family, str) and family in FAMILIES:
        return family, []
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type], []
    if model_type == "llama" or "LlamaForCausalLM" in (config.get("architectures") or []):
        return ("selfies-llama" if (path / SELFIES_TRAINING_SET).is_file() else "llama"), []
    says = f" (its config.json says model_type {model_type!r})" if model_type else ""
    raise ConfigError(f"{where}: cannot tell which model family serves {path}{says}: looked for {LOOKED_FOR}; "
                      "write a registry entry for it (docs/registry.md) and serve it with --config")


def entry_for_source(source: str, model_id: str | None = None) -> ModelEntry:
    """The registry entry of ``genserve serve --model SOURCE [--id ID]``: ``source`` resolved as an
    entry's (a directory relative to the working directory, ``package:NAME/dir``, or an ``org/name`` hub
    id, which must be in the local Hugging Face cache when offline), its family recognised from its
    files (:func:`recognise`), its id ``model_id``, else the directory's name (a hub id: the id itself)."""
    resolved = _resolve_source(source, Path.cwd(), "--model")
    directory = resolved
    if directory is None:
        from genserve.models.common.loading import local_dir  # imports torch

        try:
            directory = local_dir(source)
        except OSError as exc:
            raise ConfigError(f"--model: {exc}") from exc
    family, tasks = recognise(directory)
    mid = model_id if model_id is not None else source if resolved is None else resolved.name
    try:
        entry = ModelEntry.model_validate({"id": mid, "modality": FAMILIES[family].modality, "backend": "local",
                                           "family": family, "source": source, "tasks": tasks})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if field != "id":
            raise ConfigError(f"--model {source}: {field}: {err['msg']}") from exc
        hint = "" if model_id is not None else f" (the default, from {source!r}); name it with --id"
        raise ConfigError(f"--id: {mid!r} is not a valid model id{hint}: {err['msg']}") from exc
    entry.resolved_source = resolved
    return entry
