"""The dual-use gate on generated molecules: an upstream that returns chemical weapons agents (each in
several valid SMILES) through a genserve gateway. None of them reaches the client; each is counted in
``stats.withheld_by_moderation`` and in the metrics; drug-like molecules beside them pass unchanged.

The upstream stands in for a compromised or unmoderated genserve (``remote`` molecule backend); the
gateway's gate is the thing under test. Interpolation paths through an agent come back blanked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from rdkit import Chem

from genserve.app.moderation.molecules import DualUseGate
from tests.conftest import Server, free_port, start_server, stop_server

AGENTS = {"sarin": "CC(C)OP(C)(=O)F", "VX": "CCOP(C)(=O)SCCN(C(C)C)C(C)C", "sulfur mustard": "ClCCSCCCl",
          "tabun": "CCOP(=O)(C#N)N(C)C", "nitrogen mustard HN2": "CN(CCCl)CCCl"}
DRUGS = ["CC(=O)Oc1ccccc1C(=O)O", "Cn1c(=O)c2c(ncn2C)n(C)c1=O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
         "CC(=O)Nc1ccc(O)cc1"]


def spellings(smiles: str, k: int = 3) -> list[str]:
    """``smiles`` and other valid SMILES of the same molecule (random atom orders, Kekulé form)."""
    mol = Chem.MolFromSmiles(smiles)
    out = [smiles, Chem.MolToSmiles(mol, kekuleSmiles=True)]
    out += list(Chem.MolToRandomSmilesVect(mol, k, randomSeed=7))
    return list(dict.fromkeys(out))


def scripted() -> list[str]:
    return [s for smi in AGENTS.values() for s in spellings(smi)] + DRUGS


def upstream_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "mols", "object": "model"}]}

    @app.post("/v1/molecules/generations")
    async def generations(request: Request) -> dict:
        data = [{"smiles": s, "selfies": "[C]"} for s in scripted()]
        return {"id": "mol-x", "object": "molecule.generation", "created": 0, "model": "mols", "data": data,
                "stats": {"requested": len(data), "returned": len(data), "sampled": len(data), "invalid": 0,
                          "duplicates": 0, "rejected_by_constraints": 0, "withheld_by_moderation": 0,
                          "stopped_by": "n"}, "usage": {"prompt_tokens": 0, "completion_tokens": 0}}

    @app.post("/v1/molecules/interpolations")
    async def interpolations(request: Request) -> dict:
        path = [DRUGS[0], AGENTS["sarin"], DRUGS[1]]
        return {"object": "molecule.interpolation", "created": 0, "model": "mols",
                "data": [{"index": i, "t": i / 2, "smiles": s, "selfies": "[C]"} for i, s in enumerate(path)]}

    return app


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    upstream = uvicorn.Server(uvicorn.Config(upstream_app(), port=port, log_level="warning"))
    thread = threading.Thread(target=upstream.run, daemon=True)
    thread.start()
    while not upstream.started:
        time.sleep(0.05)
    registry = f"""include_defaults: false
models:
  - id: mols
    modality: molecule
    backend: remote
    url: http://127.0.0.1:{port}/v1
    tasks: [generation, interpolation]
"""
    gw = start_server(tmp_path_factory.mktemp("molgw"), "molgw", registry, {})
    yield gw
    stop_server(gw)
    upstream.should_exit = True
    thread.join(5)


def test_no_listed_agent_in_any_spelling_is_returned(gateway: Server) -> None:
    with gateway.client() as c:
        r = c.post("/v1/molecules/generations", json={"model": "mols", "n": len(scripted())})
    assert r.status_code == 200, r.text
    out = r.json()
    returned = [m["smiles"] for m in out["data"]]
    gate = DualUseGate()
    assert not any(gate.check(s) for s in returned)
    keys = {Chem.MolToInchiKey(Chem.MolFromSmiles(s)) for s in returned}
    assert not keys & {Chem.MolToInchiKey(Chem.MolFromSmiles(s)) for s in AGENTS.values()}
    assert sorted(returned) == sorted(DRUGS)  # the drugs beside them pass unchanged
    withheld = len(scripted()) - len(DRUGS)
    assert out["stats"]["withheld_by_moderation"] == withheld and out["stats"]["returned"] == len(DRUGS)
    assert gateway.metric("genserve_moderation_flags_total", model_name="mols", category="dual_use") >= withheld


def test_an_interpolation_point_on_an_agent_is_blanked(gateway: Server) -> None:
    with gateway.client() as c:
        r = c.post("/v1/molecules/interpolations", json={"model": "mols", "start": DRUGS[0], "end": DRUGS[1],
                                                           "steps": 3})
    assert r.status_code == 200, r.text
    points = r.json()["data"]
    assert [p["withheld_by_moderation"] for p in points] == [False, True, False]
    assert points[1].get("smiles") is None and points[1]["selfies"] == ""
    assert points[0]["smiles"] == DRUGS[0]
