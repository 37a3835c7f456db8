"""The family table: every model family genserve can load in process, and every training and
evaluation target of ``genserve train`` / ``genserve eval``.

A registry entry (``registry.yaml``) names its ``family``; the row says which module loads it,
which local backend of the app serves it (``backend``: a short key the app maps to its class), the
tasks an entry gets when it lists none, whether it takes weight-only quantization, and how its
embedded models are trained and measured. The CLI, the model manager, the task defaults and the
contract test (``tests/models/test_family_contract.py``) all read this table, and importing it
imports no family code: modules and entry points are strings, resolved when used.

Adding a family: write ``models/<family>`` (a module or a small package) with

- ``load(path, device, dtype)`` returning the object its backend kind serves (text families also
  ``load_info(path, device)``: tokenizer and limits without weights; quantizable ones take
  ``quantization=``). ``path`` is always a local directory: hub ids are resolved first;
- ``make_tiny(path)``: writes a tiny seeded instance to the directory ``path``, what the contract
  test loads and runs (families whose tiny instance needs test-only builders get them from
  ``tests/conftest.py``);

then add one :class:`Family` line below and one entry to ``registry.yaml``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """``genserve train NAME`` or ``genserve eval NAME``: an entry point ``"module:function"``.

    A train entry is called ``f(out=Path, minutes=float, seed=int, **options)`` and returns its report;
    an eval entry ``f(**options)`` and returns the table to print. ``options`` names the CLI options
    (argparse destinations) the entry takes besides those."""

    name: str
    entry: str
    options: tuple[str, ...] = ()
    weights: str = ""  # train: the directory under models/weights/ it writes by default
    minutes: float = 45.0  # train: default wall-clock budget
    threads: int = 2  # train: default torch threads

    def resolve(self) -> Callable[..., Any]:
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


def _train(name: str, entry: str, *options: str, weights: str | None = None, minutes: float = 45.0,
           threads: int = 2) -> Target:
    return Target(name, entry, ("threads", *options), weights or f"genserve-{name}", minutes, threads)


@dataclass(frozen=True)
class Family:
    name: str  # what a registry entry's ``family`` says
    modality: str  # the registry's modality: text, embedding, image, audio, molecule
    module: str  # import path of the module with ``load(path, device, dtype)``
    backend: str  # kind of local backend: text, embedding, image, speech, music, molecule, mol-vae
    tasks: tuple[str, ...]  # an entry's tasks when it lists none
    quantizable: bool = False  # ``load`` takes quantization="int8" | "int4"
    train: tuple[Target, ...] = ()  # how its embedded models are trained
    evaluate: Target | None = None  # how they are measured


EVAL_TEXT = Target("text", "genserve.models.llama.evaluate:evaluate", ("model", "quantization", "max_tokens",
                                                                         "threads"))
EVAL_MOLECULES = Target("molecules", "genserve.models.molecule.evaluate:evaluate", ("model", "samples", "out", "seed"))
EVAL_MUSIC = Target("music", "genserve.models.music.evaluate:evaluate", ("model", "out", "seed", "threads"))
EVAL_IMAGES = Target("images", "genserve.models.image.evaluate:evaluate", ("model", "samples", "seed", "scheduler",
                                                                           "steps", "guidance", "names"))

# The first family of a modality sets the tasks of an entry that names no family (a remote one).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "text", "genserve.models.llama", "text", ("completion", "chat"), quantizable=True,
           train=(Target("text-tiny", "genserve.models.llama.train:train", weights="genserve-text-tiny"),),
           evaluate=EVAL_TEXT),
    Family("sentence-transformers", "embedding", "genserve.models.embedding", "embedding", ("embedding",)),
    Family("selfies-llama", "molecule", "genserve.models.molecule.generator", "molecule", ("generation", "properties"),
           quantizable=True, train=(_train("mol", "genserve.models.molecule.train_generator:train", "molecules"),),
           evaluate=EVAL_MOLECULES),
    Family("mol-vae", "molecule", "genserve.models.molecule.vae", "mol-vae", ("interpolation",),
           train=(_train("mol-vae", "genserve.models.molecule.vae_train:train_mol_vae"),)),
    Family("diffusers", "image", "genserve.models.diffusion.loading", "image", ("generation",),
           train=(_train("diffusion", "genserve.models.diffusion.train:train", "init_from", "prediction_type", "lr"),),
           evaluate=EVAL_IMAGES),
    Family("gan", "image", "genserve.models.image.gan", "image", ("generation", "interpolation"),
           train=(_train("gan", "genserve.models.image.gan:train"),), evaluate=EVAL_IMAGES),
    Family("image-vae", "image", "genserve.models.image.vae", "image", ("generation", "interpolation"),
           train=(_train("vae", "genserve.models.image.vae:train"),), evaluate=EVAL_IMAGES),
    Family("flow", "image", "genserve.models.image.flow", "image", ("generation", "interpolation"),
           train=(_train("flow", "genserve.models.image.flow:train"),), evaluate=EVAL_IMAGES),
    Family("espeak-ng", "audio", "genserve.models.audio.espeak", "speech", ("speech",)),
    Family("transformers-tts", "audio", "genserve.models.audio.transformers_tts", "speech", ("speech",)),
    Family("chorale", "audio", "genserve.models.music.generator", "music", ("music",),
           train=(_train("music", "genserve.models.music.train:train"),), evaluate=EVAL_MUSIC),
)}

# Targets that train or measure no served family: the classifiers the image evaluations measure with.
INSTRUMENTS = (
    _train("digits-classifier", "genserve.models.image.train:train_classifier", weights="digits-classifier"),
    _train("emoji-classifier", "genserve.models.diffusion.classifier:train_emoji_classifier",
           weights="emoji-classifier", minutes=3.0, threads=1),
)
TRAIN_TARGETS: dict[str, Target] = {t.name: t for f in FAMILIES.values() for t in f.train} | {
    t.name: t for t in INSTRUMENTS}
EVAL_TARGETS: dict[str, Target] = {f.evaluate.name: f.evaluate for f in FAMILIES.values() if f.evaluate}


def family(name: str | None) -> Family:
    """The row of family ``name``; ValueError naming the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def modality_tasks(modality: str) -> tuple[str, ...]:
    """The default tasks of an entry of ``modality`` that names no family: its first family's."""
    return next((f.tasks for f in FAMILIES.values() if f.modality == modality), ())
