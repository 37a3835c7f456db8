"""``/v1/molecules/*`` over HTTP against the shipped ``genserve-mol`` and ``genserve-mol-vae``.

Every returned molecule is re-checked here with RDKit directly (not through genserve's chemistry
module), so a constraint that genserve checks wrongly fails the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

Chem = pytest.importorskip("rdkit.Chem")
from rdkit.Chem import QED, Crippen, Descriptors, rdFingerprintGenerator, rdMolDescriptors  # noqa: E402
from rdkit.DataStructs import TanimotoSimilarity  # noqa: E402

SERVER_SET = "molecule"

MOL = "genserve-mol"
VAE = "genserve-mol-vae"
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "Cn1c(=O)c2c(ncn2C)n(C)c1=O"


def generate(server, **body):
    with server.client() as c:
        return c.post("/v1/molecules/generations", json={"model": MOL, **body})


def check_stats(out: dict, n: int) -> None:
    s = out["stats"]
    assert s["requested"] == n and s["returned"] == len(out["data"])
    assert s["sampled"] == (s["returned"] + s["invalid"] + s["duplicates"] + s["rejected_by_constraints"]
                            + s["withheld_by_moderation"])
    assert s["stopped_by"] == "n" if s["returned"] == n else s["stopped_by"] in ("max_samples", "time")


def test_generation_returns_n_distinct_canonical_molecules(server):
    r = generate(server, n=50, seed=3, include=["properties", "svg"])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "molecule.generation" and out["model"] == MOL and out["id"].startswith("mol-")
    check_stats(out, 50)
    assert out["stats"]["returned"] == 50
    smiles = [m["smiles"] for m in out["data"]]
    assert len(set(smiles)) == 50
    for m in out["data"]:
        mol = Chem.MolFromSmiles(m["smiles"])
        assert mol is not None and Chem.MolToSmiles(mol) == m["smiles"]  # canonical
        assert m["properties"]["mw"] == pytest.approx(Descriptors.MolWt(mol), abs=1e-3)
        assert m["properties"]["hbd"] == rdMolDescriptors.CalcNumHBD(mol)
        assert isinstance(m["novel"], bool)
        assert ET.fromstring(m["svg"]).tag.endswith("svg")
    assert out["usage"]["prompt_tokens"] >= out["stats"]["sampled"]  # one start token per string drawn
    assert out["usage"]["completion_tokens"] > out["stats"]["sampled"]


def test_same_seed_same_molecules_whatever_else_runs(server):
    import concurrent.futures

    body = {"n": 20, "seed": 11, "temperature": 1.0, "include": []}
    alone = generate(server, **body).json()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate, server, **body) for _ in range(3)]
        futures.append(pool.submit(generate, server, n=40, seed=12))
        together = [f.result().json() for f in futures]
    for out in together[:3]:
        assert [m["smiles"] for m in out["data"]] == [m["smiles"] for m in alone["data"]]
        assert out["stats"] == alone["stats"]
    assert [m["smiles"] for m in together[3]["data"]] != [m["smiles"] for m in alone["data"]]


def test_every_molecule_satisfies_its_constraints(server):
    constraints = {"qed_min": 0.7, "mw_min": 250, "mw_max": 330, "logp_min": 1.0, "logp_max": 4.0,
                   "tpsa_max": 90, "substructure": "c1ccccc1", "similar_to": ASPIRIN, "similarity_min": 0.1}
    r = generate(server, n=10, seed=5, constraints=constraints, max_samples=1500)
    assert r.status_code == 200, r.text
    out = r.json()
    check_stats(out, 10)
    assert out["stats"]["returned"] >= 1
    benzene = Chem.MolFromSmarts("c1ccccc1")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    ref = gen.GetFingerprint(Chem.MolFromSmiles(ASPIRIN))
    for m in out["data"]:
        mol = Chem.MolFromSmiles(m["smiles"])
        assert QED.qed(mol) >= 0.7
        assert 250 <= Descriptors.MolWt(mol) <= 330
        assert 1.0 <= Crippen.MolLogP(mol) <= 4.0
        assert rdMolDescriptors.CalcTPSA(mol) <= 90
        assert mol.HasSubstructMatch(benzene)
        assert TanimotoSimilarity(ref, gen.GetFingerprint(mol)) >= 0.1
        assert m["similarity"] == pytest.approx(TanimotoSimilarity(ref, gen.GetFingerprint(mol)), abs=1e-4)


def test_impossible_constraints_stop_at_max_samples(server):
    r = generate(server, n=5, seed=1, constraints={"mw_min": 5000}, max_samples=200)
    assert r.status_code == 200, r.text
    out = r.json()
    check_stats(out, 5)
    assert out["data"] == [] and out["stats"]["sampled"] == 200 and out["stats"]["stopped_by"] == "max_samples"
    assert out["stats"]["rejected_by_constraints"] == 200 - out["stats"]["invalid"] - out["stats"]["duplicates"]


def test_hopeless_constraints_stop_at_max_seconds_with_what_was_found(server):
    """Impossible constraints and 20,000 samples allowed: sampling ends at max_seconds, and the answer
    (200, its stats) comes then, not a 504 at the deadline after all that work."""
    started = time.monotonic()
    r = generate(server, n=5, seed=1, constraints={"mw_min": 5000}, max_samples=20_000, max_seconds=1.0)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    stats = r.json()["stats"]
    check_stats(r.json(), 5)
    assert stats["stopped_by"] == "time" and 0 < stats["sampled"] < 20_000 and r.json()["data"] == []
    assert took < 10
    r = generate(server, n=1, max_seconds=61)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_seconds"
    assert "exceeds this model's limit of 60.0" in r.json()["error"]["message"]


@pytest.mark.parametrize(("constraints", "param"), [
    ({"substructure": "c1ccc("}, "constraints.substructure"),
    ({"similar_to": "not-a-smiles(", "similarity_min": 0.5}, "constraints.similar_to"),
    ({"similarity_min": 0.5}, "constraints.similarity_min"),
    ({"mw_min": 400, "mw_max": 300}, "constraints.mw_min"),
])
def test_bad_constraints_get_400_naming_the_field(server, constraints, param):
    r = generate(server, n=1, constraints=constraints)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [({"n": 1001}, "n"), ({"n": 10, "max_samples": 5}, "max_samples"),
                                             ({"n": 1, "max_samples": 10**9}, "max_samples"),
                                             ({"n": 1, "temperature": 0}, "temperature")])
def test_bad_generation_fields_get_400(server, body, param):
    r = generate(server, **body)
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or r.json()["error"]["message"])


def test_properties_per_item_errors_never_5xx(server):
    with server.client() as c:
        r = c.post("/v1/molecules/properties", json={"smiles": [ASPIRIN, "C1CC", "", CAFFEINE],
                                                    "include": ["properties", "alerts", "svg"]})
    assert r.status_code == 200, r.text
    items = r.json()["data"]
    assert [i["valid"] for i in items] == [True, False, False, True]
    assert items[0]["smiles"] == Chem.MolToSmiles(Chem.MolFromSmiles(ASPIRIN))
    assert items[0]["properties"]["hba"] == rdMolDescriptors.CalcNumHBA(Chem.MolFromSmiles(ASPIRIN))
    assert items[0]["properties"]["lipinski_violations"] == 0
    assert "error" in items[1] and "properties" not in items[1]
    assert ET.fromstring(items[3]["svg"]).tag.endswith("svg")
    assert isinstance(items[0]["alerts"], list)


def test_properties_flags_a_pains_alert(server):
    rhodanine_ene = "O=C1NC(=S)SC1=Cc1ccccc1"
    with server.client() as c:
        r = c.post("/v1/molecules/properties", json={"smiles": [rhodanine_ene], "include": ["alerts"]})
    catalogs = {a["catalog"] for a in r.json()["data"][0]["alerts"]}
    assert "PAINS" in catalogs


# 16 of these (191 atoms each) are one task of the chemistry workers: about a second with drawings.
SUGAR_CHAIN = "OC1C(O)C(O)C(CO)OC1" + "OC1C(O)C(O)C(CO)OC1O" * 15


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server's workers in /proc")
def test_a_chemistry_worker_killed_mid_request_is_a_500_and_the_server_carries_on(server):
    """Properties run RDKit on the caller's molecules in worker processes (app/backends/chemistry.py).
    One killed by SIGSEGV while it describes a request's molecules, as a crash in RDKit's C++ would kill
    it, costs that request a 500 in OpenAI's body; the server stays up, and a request beside it and the
    next one are answered (by the other worker, or the one that replaces it)."""
    url, light = "/v1/molecules/properties", {"smiles": [ASPIRIN, CAFFEINE]}
    with server.client() as c:
        assert c.post(url, json=light).status_code == 200  # the workers run
    workers = [w for fs in _children(server.proc.pid) if b"forkserver" in Path(f"/proc/{fs}/cmdline").read_bytes()
               for w in _children(fs)]
    assert workers, "no chemistry workers under the server"
    ticks = {w: _cpu_ticks(w) for w in workers}
    for _ in range(50):  # idle (a second worker may still be warming up)
        time.sleep(0.1)
        ticks, before = {w: _cpu_ticks(w) for w in workers}, ticks
        if ticks == before:
            break

    def post(body: dict) -> httpx.Response:
        with server.client() as client:
            return client.post(url, json=body)

    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(post, {"smiles": [SUGAR_CHAIN] * 16, "include": ["properties", "alerts", "svg"]})
        deadline = time.monotonic() + 30
        while not (busy := [w for w in workers if _cpu_ticks(w) - ticks[w] >= 10]):  # 0.1 s of its CPU
            assert time.monotonic() < deadline and not doomed.done(), "no worker took the request"
            time.sleep(0.01)
        os.kill(busy[0], signal.SIGSEGV)
        beside = pool.submit(post, light)
        r = doomed.result(timeout=60)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
        assert err["code"] == "worker_crashed" and "SIGSEGV" in err["message"]
        assert beside.result(timeout=60).status_code == 200
    assert post(light).json()["data"][0]["valid"]
    assert server.proc.poll() is None and httpx.get(server.url + "/health/live").status_code == 200


def test_interpolation_walks_from_start_to_end(server):
    with server.client() as c:
        r = c.post("/v1/molecules/interpolations", json={"model": VAE, "start": ASPIRIN, "end": CAFFEINE,
                                                         "steps": 6})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 6 and data[0]["t"] == 0 and data[-1]["t"] == 1
    assert all(d["smiles"] is None or Chem.MolFromSmiles(d["smiles"]) is not None for d in data)
    assert sum(d["smiles"] is not None for d in data) >= 4


def test_interpolation_rejects_a_bad_end_by_name(server):
    with server.client() as c:
        r = c.post("/v1/molecules/interpolations", json={"model": VAE, "start": ASPIRIN, "end": "C1CC", "steps": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "end"


def test_generation_model_cannot_interpolate(server):
    with server.client() as c:
        r = c.post("/v1/molecules/interpolations", json={"model": MOL, "start": ASPIRIN, "end": CAFFEINE})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"


def test_molecule_metrics_count_what_was_sampled(server):
    before = server.metric("genserve_molecules_sampled_total", model_name=MOL)
    out = generate(server, n=7, seed=21, include=[]).json()
    after = server.metric("genserve_molecules_sampled_total", model_name=MOL)
    assert after - before == out["stats"]["sampled"]
    assert server.metric("genserve_molecules_total", model_name=MOL, outcome="returned") >= 7


SARIN = "CC(C)OP(C)(=O)F"
SARIN_AGAIN = "FP(=O)(C)OC(C)C"  # the same agent, another valid SMILES


@pytest.mark.parametrize("constraints", [{"similar_to": SARIN}, {"similar_to": SARIN_AGAIN},
                                         {"substructure": "P(=O)F"}, {"substructure": "ClCCSCCCl"}])
def test_constraints_that_target_a_chemical_weapon_are_refused(server, constraints):
    r = generate(server, n=2, seed=1, constraints=constraints)
    assert r.status_code == 400
    err = r.json()["error"]
    kind = next(iter(constraints))
    assert (err["code"], err["param"]) == ("content_policy_violation", f"constraints.{kind}")


@pytest.mark.parametrize("reference", [ASPIRIN, CAFFEINE, "CC(C)Cc1ccc(cc1)C(C)C(=O)O"])
def test_drug_like_references_are_not_refused(server, reference):
    r = generate(server, n=2, seed=1, max_samples=400, constraints={"similar_to": reference, "similarity_min": 0.0})
    assert r.status_code == 200, r.text


def test_interpolation_from_an_agent_is_refused(server):
    with server.client() as c:
        r = c.post("/v1/molecules/interpolations", json={"model": VAE, "start": SARIN_AGAIN, "end": ASPIRIN,
                                                          "steps": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "start"


def test_dual_use_gate_counts_in_metrics(server):
    generate(server, n=1, seed=2, constraints={"similar_to": SARIN})
    assert server.metric("genserve_moderation_flags_total", model_name=MOL, category="dual_use") >= 1


def test_a_client_that_leaves_stops_the_sampling(server):
    """Hopeless constraints with 20 s and 20,000 samples allowed, and a client that gives up after
    0.5 s: the engine's token counter (a token per sequence and step) moves by at most one step after
    the client left (issue 19: disconnects stop the work within one step)."""
    import httpx

    from tests.conftest import API_KEY

    def tokens() -> float:
        return server.metric("genserve_generation_tokens_total", model_name=MOL)

    before = tokens()
    aborts = server.metric("genserve_request_success_total", model_name=MOL, finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/molecules/generations", timeout=0.5,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MOL, "n": 5, "seed": 2, "constraints": {"mw_min": 5000}, "max_samples": 20_000,
                         "max_seconds": 20})
    left, at_leaving = time.monotonic(), tokens()
    done = at_leaving
    while time.monotonic() < left + 10:  # until the counter stops moving
        time.sleep(0.5)
        if (now := tokens()) == done:
            break
        done = now
    print(f"tokens: {done - before:.0f} sampled, {done - at_leaving:.0f} of them after the client left")
    assert done - before > 0, "the request never started"
    assert done - at_leaving <= 256, "sampling went on past one engine step (256 sequences) after its client left"
    assert server.metric("genserve_request_success_total", model_name=MOL, finished_reason="abort") > aborts
