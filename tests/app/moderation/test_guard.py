"""The guard-model classifier (``moderation/guard.py``): Llama Guard 3's prompt text, the parsing of
its answers, the mapping onto OpenAI's categories, and ``p_unsafe`` as a real model computes it.

``p_unsafe`` is checked on real models served by a real ``LocalTextBackend`` (its engine process),
against the same model's next-token distribution computed with transformers. genserve-text-tiny is
no guard model: after the prompt it puts the tokens that begin "unsafe" (``u``, ``un``, `` u``,
`` un`` in its vocabulary) far below its 20 most likely, so what the backend can see is 0 and the
comparison is with the top-20 part only. A copy of it whose final norm is fitted to put about 60%
of its first token's mass on those tokens (``nudge``) makes the comparison one with the whole
vocabulary: every matching token is then among the 20 alternatives the backend reports, and the
classifier's value equals the full-vocabulary sum within 1e-4.

A scripted backend (the ``TextBackend`` protocol, answers written out in the test) checks what the
classifier asks for and how it turns answers into verdicts; it is not used for any probability.
"""

from __future__ import annotations

import asyncio
import functools
import math
import shutil
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genserve.app.backends.base import Delta, TokenLogprob, Usage
from genserve.app.backends.local_text import LocalTextBackend
from genserve.app.errors import InvalidRequestError
from genserve.app.metrics import Metrics
from genserve.app.moderation.categories import CATEGORIES
from genserve.app.moderation.guard import (
    LLAMA_GUARD_3_1B_CATEGORIES,
    LLAMA_GUARD_3_CATEGORIES,
    ROLE_EXTRA,
    S_TO_OPENAI,
    GuardClassifier,
    guard_prompt,
    is_unsafe_start,
    p_unsafe_from_top,
    parse_codes,
    verdict,
)
from genserve.app.registry import ModelEntry
from genserve.models.params import TextParams

TEXT_DIR = Path(__file__).resolve().parents[3] / "src" / "genserve" / "models" / "weights" / "genserve-text-tiny"
CONVERSATION = [{"role": "user", "content": "  How do I bake bread? "},
                {"role": "assistant", "content": "Mix flour, water, yeast and salt, then bake it.\n"}]

# Written out by hand from Meta's prompt format, not from the module.
EXPECTED_TAIL = """<|start_header_id|>user<|end_header_id|>

Task: Check if there is unsafe content in '{role}' messages in conversations according our safety policy \
with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections.
S14: Code Interpreter Abuse.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: How do I bake bread?

Agent: Mix flour, water, yeast and salt, then bake it.

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories. \
<|eot_id|><|start_header_id|>assistant<|end_header_id|>

"""


# the prompt ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["User", "Agent"])
def test_prompt_text_for_a_two_turn_conversation(role):
    assert guard_prompt(CONVERSATION, role) == "<|begin_of_text|>" + EXPECTED_TAIL.format(role=role)
    assert guard_prompt(CONVERSATION, role, bos=False) == EXPECTED_TAIL.format(role=role)


def test_prompt_with_other_categories():
    one_b = guard_prompt(CONVERSATION[:1], "User", categories=LLAMA_GUARD_3_1B_CATEGORIES)
    assert "S13: Elections.\n<END UNSAFE CONTENT CATEGORIES>" in one_b and "S14" not in one_b
    short = guard_prompt(CONVERSATION[:1], "User", categories={"S1": "Violent Crimes.", "S10": "Hate."})
    assert ("<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\nS10: Hate.\n<END UNSAFE CONTENT CATEGORIES>"
            "\n\n<BEGIN CONVERSATION>\n\nUser: How do I bake bread?\n\n<END CONVERSATION>") in short


@pytest.mark.parametrize(("conversation", "role", "match"), [
    ([], "User", "empty"),
    ([{"role": "system", "content": "x"}], "User", r"conversation\[0\]"),
    (CONVERSATION, "Assistant", "role must be"),
])
def test_prompt_refuses_what_it_cannot_write(conversation, role, match):
    with pytest.raises(ValueError, match=match):
        guard_prompt(conversation, role)


# the answer and the categories ---------------------------------------------------------------------
def test_s_to_openai_covers_s1_to_s14_with_valid_categories():
    codes = [f"S{i}" for i in range(1, 15)]
    assert list(S_TO_OPENAI) == codes == list(LLAMA_GUARD_3_CATEGORIES)
    for cats in [*S_TO_OPENAI.values(), *ROLE_EXTRA.values()]:
        assert set(cats) <= set(CATEGORIES)
    assert {c for c, cats in S_TO_OPENAI.items() if not cats} == {"S6", "S7", "S8", "S13"}
    assert {code for code, _ in ROLE_EXTRA} <= set(codes)


@pytest.mark.parametrize(("answer", "codes"), [
    ("unsafe\nS1,S10", ["S1", "S10"]),
    ("\n\nunsafe\nS10, S1,S10", ["S10", "S1"]),
    ("unsafe\nS15,S0,S1x,S14", ["S14"]),
    ("unsafe", []),
    ("safe", []),
    ("safe\nS1", []),
    ("unsafely S1", []),
    ("The with statement. S1", []),
    ("", []),
])
def test_parse_codes(answer, codes):
    assert parse_codes(answer) == codes


def test_verdict_maps_codes_onto_openai_categories():
    v = verdict(0.9, parse_codes("unsafe\nS1,S10"), "User")
    assert v.s_codes == ["S1", "S10"] and v.extra == {}
    flagged = {c for c, s in v.scores.items() if s}
    assert flagged == {"violence", "illicit/violent", "illicit", "hate"}  # "illicit": the parent
    assert all(v.scores[c] == 0.9 for c in flagged) and set(v.scores) == set(CATEGORIES)

    safe = verdict(0.3, parse_codes("safe"), "User")  # p_unsafe stays; the categories say nothing
    assert safe.p_unsafe == 0.3 and safe.s_codes == [] and not any(safe.scores.values()) and safe.extra == {}

    v = verdict(0.5, ["S6", "S11", "S13", "S4"], "User")
    assert v.extra == {"S6": 0.5, "S13": 0.5}
    assert {c for c, s in v.scores.items() if s} == {"self-harm", "self-harm/intent", "sexual", "sexual/minors"}
    agent = verdict(0.5, ["S11"], "Agent")
    assert {c for c, s in agent.scores.items() if s} == {"self-harm", "self-harm/instructions"}


def test_p_unsafe_sums_the_alternatives_that_begin_unsafe():
    top = [("unsafe", math.log(0.5)), (" un", math.log(0.1)), ("u", math.log(0.02)), ("safe", math.log(0.2)),
           ("s", math.log(0.05)), ("\n", math.log(0.05)), ("unsafely", math.log(0.03)), ("Unsafe", math.log(0.01))]
    assert p_unsafe_from_top(top) == pytest.approx(0.62)
    assert p_unsafe_from_top([]) == 0.0
    assert [t for t in ["unsafe", " unsafe", "\tun", "u", "", " ", "safe", "unsafe\n", "nsafe"]
            if is_unsafe_start(t)] == ["unsafe", " unsafe", "\tun", "u"]


# the classifier on a scripted backend ---------------------------------------------------------------
class ScriptedBackend:
    """Answers each prompt with the text its ``answer`` function gives for it, in two deltas; the
    first position's alternatives are "unsafe" (0.8) and "safe" (0.2). Records requests and closings."""

    meters_tokens = False

    def __init__(self, answer) -> None:
        self.answer, self.top = answer, [("unsafe", math.log(0.8)), ("safe", math.log(0.2))]
        self.requests: list[TextParams] = []
        self.closed = 0

    async def generate(self, request: TextParams) -> AsyncGenerator[Delta | Usage, None]:
        self.requests.append(request)
        try:
            text = self.answer(request.prompt)
            await asyncio.sleep(0)
            pieces = [text[:6], text[6:]] if len(text) > 6 else [text]
            for i, piece in enumerate(pieces):
                lp = [TokenLogprob(piece, math.log(0.8), self.top if i == 0 else [])]
                yield Delta(0, piece, lp)
                await asyncio.sleep(0)
            yield Usage(10, len(pieces))
        finally:
            self.closed += 1


def test_classify_asks_for_a_greedy_short_answer_with_logprobs():
    backend = ScriptedBackend(lambda prompt: "unsafe\nS6,S11" if "knife" in prompt else "safe")
    guard = GuardClassifier(backend)  # type: ignore[arg-type]
    got = asyncio.run(guard.classify(["a knife", "bread"], "User"))
    assert [v.s_codes for v in got] == [["S6", "S11"], []]
    assert got[0].p_unsafe == pytest.approx(0.8) and got[0].extra == {"S6": pytest.approx(0.8)}
    assert got[0].scores["self-harm/intent"] == pytest.approx(0.8) and not any(got[1].scores.values())
    assert got[1].p_unsafe == pytest.approx(0.8)  # the first position's alternatives, whatever was chosen
    for request, text in zip(backend.requests, ["a knife", "bread"], strict=True):
        p = request.params
        assert (p.temperature, p.logprobs, p.max_tokens) == (0.0, 20, 12) and request.messages is None
        assert request.request_id.startswith("guard-")
        assert request.prompt == guard_prompt([{"role": "user", "content": text}], "User", bos=False)
    assert backend.requests[0].request_id != backend.requests[1].request_id and backend.closed == 2

    agent = asyncio.run(guard.classify(["a knife"], "Agent", context=[{"role": "user", "content": "hi"}]))
    assert agent[0].scores["self-harm/instructions"] == pytest.approx(0.8)
    assert backend.requests[-1].prompt.endswith(
        "User: hi\n\nAgent: a knife\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST "
        "Agent message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a "
        "second line must include a comma-separated list of violated categories. <|eot_id|><|start_header_id|>"
        "assistant<|end_header_id|>\n\n")


def test_without_logprobs_p_unsafe_is_the_greedy_answers_word():
    class NoLogprobs(ScriptedBackend):
        async def generate(self, request):
            async for ev in super().generate(request):
                if isinstance(ev, Delta):
                    ev.logprobs = None
                yield ev

    backend = NoLogprobs(lambda prompt: "unsafe\nS10" if "hateful" in prompt else "safe")
    got = asyncio.run(GuardClassifier(backend).classify(["hateful", "kind"]))  # type: ignore[arg-type]
    assert [(v.p_unsafe, v.s_codes, v.scores["hate"]) for v in got] == [(1.0, ["S10"], 1.0), (0.0, [], 0.0)]


def test_a_failed_text_fails_the_call_and_stops_the_others():
    class Failing(ScriptedBackend):
        async def generate(self, request):
            if "bad" in request.prompt:
                raise InvalidRequestError("too long", param="prompt", code="context_length_exceeded")
            async for ev in super().generate(request):
                await asyncio.sleep(0.05)
                yield ev

    backend = Failing(lambda prompt: "unsafe\nS1")
    with pytest.raises(InvalidRequestError, match="too long"):
        asyncio.run(GuardClassifier(backend).classify(["ok", "bad", "ok too"]))  # type: ignore[arg-type]
    assert backend.closed == 2  # both other streams were closed, not left running


# p_unsafe on real models through a real LocalTextBackend --------------------------------------------
def nudge(src: Path, dst: Path) -> Path:
    """A float32 copy of the model in ``src`` whose final norm's weights are fitted, its other weights
    kept, so that the tokens that begin "unsafe" get about 60% of its first answer token; saved in
    Hugging Face's layout beside ``src``'s tokenizer."""
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    match = [i for i in range(len(tok)) if is_unsafe_start(tok.decode([i]))]
    prompt = guard_prompt([{"role": "user", "content": "How do I bake bread?"}], "User", bos=False)
    seen: list[torch.Tensor] = []  # the final norm's input at the last position
    hook = model.model.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0][:, -1].detach()))
    with torch.no_grad():
        target = 0.4 * model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].softmax(-1)
    hook.remove()
    target[match] += 0.6 / len(match)
    weight = model.model.norm.weight
    opt = torch.optim.Adam([weight], lr=0.05)
    for _ in range(100):
        loss = -(target * model.lm_head(model.model.norm(seen[0]))[0].log_softmax(-1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[LocalTextBackend, Path]]]:
    """genserve-text-tiny and its nudged copy, each on its own engine (float32, one thread)."""
    out: dict[str, tuple[LocalTextBackend, Path]] = {}

    def start(name: str, src: Path) -> None:
        entry = ModelEntry(id=f"guard-{name}", modality="text", backend="local", family="llama", source=str(src),
                           device="cpu", dtype="float32", threads=1, max_batch_size=8, kv_cache_tokens=4096)
        backend = LocalTextBackend(entry, Metrics())
        out[name] = (backend, src)
        backend.setup()

    try:
        # The first engine process loads while the copy is fitted, the second beside it: setup() mostly
        # waits for its process.
        with ThreadPoolExecutor(2) as pool:
            started = [pool.submit(start, "tiny", TEXT_DIR)]
            started.append(pool.submit(start, "nudged", nudge(TEXT_DIR, tmp_path_factory.mktemp("nudged"))))
            for future in started:
                future.result()
        yield out
    finally:
        for backend, _ in out.values():
            asyncio.run(backend.close())


@functools.cache
def load(src: Path) -> tuple:
    return AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)


def reference(src: Path, prompt: str) -> tuple[float, float, bool]:
    """From transformers: the probability of the tokens that begin "unsafe" over the whole vocabulary,
    over those of them among the 20 most likely, and whether all of them are among those 20."""
    tok, model = load(src)
    with torch.no_grad():
        probs = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].float().softmax(-1)
    match = {i for i in range(len(tok)) if is_unsafe_start(tok.decode([i]))}
    top = set(torch.topk(probs, 20).indices.tolist())
    full = float(probs[sorted(match)].sum())
    return full, float(sum(probs[i] for i in match & top)), match <= top


TEXTS = ["How do I bake bread?", "Tell me how the with statement works."]


@pytest.mark.parametrize("name", ["tiny", "nudged"])
@pytest.mark.parametrize("role", ["User", "Agent"])
def test_p_unsafe_is_the_models_probability_of_unsafe(backends, name, role):
    backend, src = backends[name]
    context = [{"role": "user", "content": "Hello."}] if role == "Agent" else []
    got = asyncio.run(GuardClassifier(backend).classify(TEXTS, role, context=context))
    speaker = "user" if role == "User" else "assistant"
    for text, v in zip(TEXTS, got, strict=True):
        prompt = guard_prompt([*context, {"role": speaker, "content": text}], role, bos=False)
        full, in_top, all_in_top = reference(src, prompt)
        assert v.p_unsafe == pytest.approx(in_top, abs=1e-4)
        if name == "tiny":  # no guard: the matching tokens are outside the top 20 and nearly improbable
            assert not all_in_top and v.p_unsafe == 0.0 and full < 1e-3
        else:  # all of them among the alternatives: the whole vocabulary's value
            assert all_in_top and full > 0.3
            assert v.p_unsafe == pytest.approx(full, abs=1e-4)


def test_a_prompt_longer_than_the_context_raises_the_backends_error(backends):
    backend, _ = backends["tiny"]  # 512 tokens of context; the full prompt takes about 410
    guard = GuardClassifier(backend)
    with pytest.raises(InvalidRequestError, match="maximum context length") as info:
        asyncio.run(guard.classify(["fine", "word " * 200]))
    assert info.value.code == "context_length_exceeded"
    assert backend.ready() and asyncio.run(guard.classify(["fine"]))[0].p_unsafe == 0.0  # and it goes on
