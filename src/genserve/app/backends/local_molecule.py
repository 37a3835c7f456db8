"""Local molecule models.

``LocalMoleculeBackend`` samples a SELFIES decoder (family ``selfies-llama``) on the text engine:
a round of ``count`` molecules is one engine request with ``n = count`` sequences, each started
from the beginning-of-molecule token with its own seed, so rounds share engine steps with each
other and with every other request. RDKit examines the strings the engine has finished (in the
chemistry pool) while it samples the rest; what to draw and what to keep is ``models.molecule.sampling``.
``LocalMolVAEBackend`` runs the molecular VAE's latent interpolation (family ``mol-vae``) through a
dynamic batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator

from genserve.app.backends.base import Backend, ModelFacts, Molecule, MoleculeEvent, MoleculeStats, Usage
from genserve.app.backends.batching import BatchedBackend
from genserve.app.backends.chemistry import chemistry_pool
from genserve.app.backends.local_text import LocalTextBackend
from genserve.app.metrics import Metrics
from genserve.app.registry import ModelEntry
from genserve.models.common.loading import local_dir
from genserve.models.errors import InputError
from genserve.models.molecule import chem
from genserve.models.molecule import sampling as rounds
from genserve.models.molecule.generator import TrainingSet
from genserve.models.params import MoleculeInterpolationParams, MoleculeParams, TextParams
from genserve.models.text.sampling import SamplingParams


def _molecule(c: rounds.Candidate) -> Molecule:
    return Molecule(smiles=c.smiles, selfies=c.selfies, properties=c.properties, novel=c.novel,
                    similarity=c.similarity, svg=c.svg)


class LocalMoleculeBackend(Backend):
    def __init__(self, entry: ModelEntry, metrics: Metrics) -> None:
        super().__init__(entry)
        self.text = LocalTextBackend(entry, metrics)  # the engine process, its limits and metrics
        self.training_set: TrainingSet | None = None
        self.bos_id = 0

    def check_room(self, task: str) -> None:
        self.text.check_room(task)  # generation rounds queue in the engine

    def setup(self) -> None:
        self.text.setup()
        tm = self.text.tm
        if tm is None or tm.tokenizer.bos_token_id is None:
            raise ValueError(f"{self.entry.source}: a SELFIES generator's tokenizer needs a bos_token to sample from")
        self.bos_id = tm.tokenizer.bos_token_id
        self.training_set = TrainingSet.load(local_dir(self.entry.resolved_source or self.entry.source or ""))
        self.loaded = True

    def ready(self) -> bool:
        return self.loaded and self.text.ready()

    def drain(self) -> None:
        self.text.drain()

    async def close(self) -> None:
        await self.text.close()

    def describe(self) -> ModelFacts:
        return ModelFacts(training_set_size=len(self.training_set) if self.training_set else None)

    async def generate(self, params: MoleculeParams) -> AsyncGenerator[MoleculeEvent, None]:
        """The kept molecules, round by round, then the stats of every string drawn."""
        compiled = rounds.compile_constraints(params.constraints)  # a bad one: InputError naming the field
        tally, ends, out_of_time = rounds.Tally(), None, False
        if params.max_seconds is not None:
            ends = asyncio.get_running_loop().time() + params.max_seconds
        while len(tally.kept) < params.n and tally.sampled < params.max_samples:
            count = rounds.round_size(params.n - len(tally.kept), tally, params.max_samples)
            try:
                async with asyncio.timeout_at(ends):  # a round cut short is dropped; the engine aborts it
                    analysed = await self._round(params, compiled, count, rounds.round_seed(params.seed, tally),
                                                 tally)
            except TimeoutError:
                out_of_time = True
                break
            tally.drawn += count
            for kept in rounds.select([analysed[i] for i in range(count)], params.n, params.unique, tally):
                yield _molecule(kept)
        yield MoleculeStats(requested=params.n, returned=len(tally.kept), sampled=tally.sampled,
                            invalid=tally.invalid, duplicates=tally.duplicates, rejected_by_constraints=tally.rejected,
                            withheld_by_moderation=0,
                            stopped_by="n" if len(tally.kept) == params.n else "time" if out_of_time else "max_samples",
                            prompt_tokens=tally.drawn, completion_tokens=tally.tokens)

    async def _round(self, params: MoleculeParams, compiled: chem.CompiledConstraints, count: int, seed: int,
                     tally: rounds.Tally) -> dict[int, rounds.Candidate]:
        """``count`` strings, string ``i`` from seed ``seed + i * stride`` (the engine's ``n`` derivation),
        each analysed as soon as the engine finishes it."""
        loop, work = asyncio.get_running_loop(), []
        sampling = SamplingParams(n=count, temperature=params.temperature, top_k=params.top_k, seed=seed,
                                  max_tokens=self.text.max_len() - 1)
        texts = [""] * count
        analyse = functools.partial(rounds.analyse_all, include=params.include, compiled=compiled,
                                    training_set=self.training_set)
        request = TextParams(f"{params.request_id}-{tally.sampled}", sampling, prompt=[self.bos_id])
        async with contextlib.aclosing(self.text.generate(request)) as events:  # closing us aborts the round
            async for ev in events:
                if isinstance(ev, Usage):
                    tally.tokens += ev.completion_tokens
                    continue
                texts[ev.index] += ev.text
                if ev.finish_reason is not None:
                    work.append(loop.run_in_executor(chemistry_pool(), analyse, [(ev.index, texts[ev.index])]))
        return dict(pair for batch in await asyncio.gather(*work) for pair in batch)


class LocalMolVAEBackend(BatchedBackend):
    def setup(self) -> None:
        self.model = self.load_model()
        self.loaded = True

    async def start(self) -> None:
        from genserve.models.molecule.vae import interpolate

        model = self.model

        def run(items: list[MoleculeInterpolationParams]) -> list[list[str] | InputError]:
            out: list[list[str] | InputError] = []
            for p in items:
                try:
                    out.append(interpolate(model, p.start, p.end, p.steps, p.method))
                except InputError as exc:  # the caller's molecule, not the batch, is at fault
                    out.append(exc)
            return out

        self.start_batcher(run)

    async def interpolate(self, params: MoleculeInterpolationParams) -> list[Molecule]:
        """The path's points in order, each described in the chemistry pool."""
        assert self.batcher is not None
        (result,) = await self.batcher.submit_many([params])
        if isinstance(result, InputError):
            raise result
        points = await asyncio.get_running_loop().run_in_executor(
            chemistry_pool(), lambda: [rounds.path_molecule(s, params.include) for s in result])
        return [_molecule(p) for p in points]
