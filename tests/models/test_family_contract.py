"""The contract of every family in the family table (``models/registry.py``), with no list to edit:
a new row is tested as soon as it exists.

For each family: a tiny seeded instance (the family module's ``make_tiny(path)``; the two families
whose tiny instance needs test-only builders take them from ``tests/conftest.py``) is loaded through
the table (``load_family``) and run once per item of a small request. Then:

- a seeded item alone gives the same output as inside a batch of three, with the per-item seed that
  ``models/seeding.py`` gives it (text and molecule samples: ``sample_seed``; images, speech pieces,
  music pieces and latent decodes: ``item_seed``); for embeddings, which have no seed, an input alone
  against the same input between two others of other lengths;
- the saved directory alone fixes the output: loaded twice under different global random states,
  the model gives the same outputs (no weight or buffer left to initialisation).

The runner of each backend kind (what serving calls on the loaded object) is below, keyed by the
table's ``backend`` field: a new family of an existing kind brings nothing here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genserve.models.common.loading import load_family
from genserve.models.registry import FAMILIES, Family
from genserve.models.seeding import item_seed, sample_seed
from tests.conftest import build_tiny_sd, build_tiny_vits

SEED = 1234
BATCH = 3
# Families whose tiny instance needs a builder that lives with the tests (it builds on test-only choices).
TEST_BUILDERS: dict[str, Callable[[Path], Path]] = {"diffusers": build_tiny_sd, "transformers-tts": build_tiny_vits}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine they run many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_tiny(family: Family, path: Path) -> Path:
    if family.name in TEST_BUILDERS:
        return TEST_BUILDERS[family.name](path)
    module = importlib.import_module(family.module)
    assert hasattr(module, "make_tiny"), (f"family {family.name!r}: {family.module} has no make_tiny(path); "
                                          "the family protocol (models/registry.py) asks for one")
    module.make_tiny(path)
    return path


def run_text(tm: Any, seed: int, n: int) -> list[list[int]]:
    """``n`` samples of one prompt: sample k draws from ``sample_seed(seed, k)``."""
    from genserve.models.text.generate import generate
    from genserve.models.text.sampling import SamplingParams

    params = SamplingParams(n=n, seed=seed, max_tokens=6, temperature=1.0, ignore_eos=True)
    out: list[list[int]] = [[] for _ in range(n)]
    for step in generate(tm, tm.tokenizer("C")["input_ids"], params):
        for sample in step:
            out[sample.index].append(sample.token.token_id)
    return out


def run_embedding(model: Any, seed: int, n: int) -> list[np.ndarray]:
    """Embeddings are not seeded: input 1 of three, of other lengths, against the same input alone."""
    texts = ["a molecule", "the seed of an image walks a latent path", "hi"]
    texts = texts[:n] if n > 1 else texts[1:2]
    return [np.asarray(row) for row in model.embed(model.tokenize(texts))]


def run_image(model: Any, seed: int, n: int) -> list[np.ndarray]:
    """Through the runner serving gives the loaded object (``runner_for``): for a diffusers pipeline the
    runner that has probed its denoiser and runs its batch-variant layers row by row."""
    from genserve.models.image.runner import runner_for
    from genserve.models.params import ImageJob

    runner = runner_for(model, max_rows=2 * BATCH)  # rows double with classifier-free guidance
    width, height = runner.native
    jobs = [ImageJob(prompt="a red apple", seed=item_seed(seed, k), width=width, height=height, steps=2)
            for k in range(n)]
    return runner.run(jobs)


def run_speech(model: Any, seed: int, n: int) -> list[np.ndarray]:
    from genserve.models.audio import SpeechSpec

    specs = [SpeechSpec("hello there", model.resolve_voice(model.default_voice), seed=item_seed(seed, k))
             for k in range(n)]
    if model.streams:  # a process per utterance: nothing is batched
        return [model.synthesize(spec) for spec in specs]
    return model.synthesize(specs)


def run_music(model: Any, seed: int, n: int) -> list[Any]:
    from genserve.models.music import MusicSpec

    return [p.voices for p in model.generate([MusicSpec(seconds=2, seed=item_seed(seed, k)) for k in range(n)])]


def run_mol_vae(model: Any, seed: int, n: int) -> list[list[int]]:
    """Sampled decodes of latent k = N(0, I) drawn from ``item_seed(seed, k)``, each with its own generator."""
    seeds = [item_seed(seed, k) for k in range(n)]
    z = torch.stack([torch.randn(model.config.latent_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return model.decode(z, generator=[torch.Generator().manual_seed(s) for s in seeds], temperature=1.0)


RUNNERS: dict[str, Callable[[Any, int, int], list]] = {
    "text": run_text, "molecule": run_text, "embedding": run_embedding, "image": run_image, "speech": run_speech,
    "music": run_music, "mol-vae": run_mol_vae}
# The seed an item of a request gets when it runs alone (models/seeding.py); embeddings have none.
ITEM_SEED: dict[str, Callable[[int, int], int]] = {"text": sample_seed, "molecule": sample_seed}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b)
    return a == b


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    family = FAMILIES[request.param]
    return family, build_tiny(family, tmp_path_factory.mktemp(family.name))


def test_every_backend_kind_has_a_runner() -> None:
    assert {f.backend for f in FAMILIES.values()} <= RUNNERS.keys()


def test_a_seeded_item_alone_equals_it_inside_a_batch(tiny: tuple[Family, Path]) -> None:
    family, path = tiny
    model = load_family(family.name, path, "cpu", "float32")
    run = RUNNERS[family.backend]
    batch = run(model, SEED, BATCH)
    assert len(batch) == BATCH
    if family.backend == "embedding":
        alone = run(model, SEED, 1)[0]
        assert np.allclose(alone, batch[1], atol=1e-5)  # padding changes the summation order, not the result
        return
    alone = run(model, ITEM_SEED.get(family.backend, item_seed)(SEED, 1), 1)[0]
    assert same(alone, batch[1]), f"{family.name}: item 1 alone differs from item 1 of a batch of {BATCH}"
    if not getattr(model, "streams", False):  # espeak-ng speaks without randomness: it takes no seed
        assert not same(batch[0], batch[1]), f"{family.name}: two seeds gave the same output"


def test_the_saved_directory_alone_fixes_the_output(tiny: tuple[Family, Path]) -> None:
    family, path = tiny
    runs = []
    for state in (0, 99):
        torch.manual_seed(state)
        runs.append(RUNNERS[family.backend](load_family(family.name, path, "cpu", "float32"), SEED, 2))
    assert all(same(a, b) for a, b in zip(*runs, strict=True)), f"{family.name}: two loads of one directory differ"
