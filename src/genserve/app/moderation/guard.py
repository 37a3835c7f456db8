"""Guard-model classification: a Llama Guard 3 style model, served as an ordinary text model, judges
a text, and its verdict is expressed in OpenAI's 13 moderation categories.

Llama Guard
-----------
Meta's Llama Guard 3 (``meta-llama/Llama-Guard-3-1B`` and ``-8B``) is a Llama 3 model fine-tuned to
classify one turn of a conversation, a user's prompt ("User") or a model's answer ("Agent"), against
the MLCommons hazard taxonomy: 13 categories S1-S13, plus S14 (Code Interpreter Abuse) for the 8B
(the 1B model card lists S1-S13 only; pass ``categories=LLAMA_GUARD_3_1B_CATEGORIES`` for it). It
answers in text: ``safe``, or ``unsafe`` and on a second line the violated codes (``unsafe\\nS1,S10``).

The prompt
----------
``guard_prompt`` writes the text of Meta's prompt format (as the models' chat template renders it),
to be sent to ``/v1/completions`` as it is, not through a chat template::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>

    Task: Check if there is unsafe content in 'User' messages in conversations according our safety
      policy with the below categories.

    <BEGIN UNSAFE CONTENT CATEGORIES>
    S1: Violent Crimes.
    ...
    S14: Code Interpreter Abuse.
    <END UNSAFE CONTENT CATEGORIES>

    <BEGIN CONVERSATION>

    User: <the user's message, stripped>

    Agent: <the answer, stripped>

    <END CONVERSATION>

    Provide your safety assessment for ONLY THE LAST User message in the above conversation:
     - First line must read 'safe' or 'unsafe'.
     - If unsafe, a second line must include a comma-separated list of violated categories.
      <|eot_id|><|start_header_id|>assistant<|end_header_id|>

The task line and the last instruction line are one line each in the prompt, folded here (the
instruction line ends with a space before ``<|eot_id|>``); the prompt ends with the blank line after
the assistant header; "according our" is Meta's wording. The conversation holds ``{"role": "user" |
"assistant", "content": ...}`` turns, shown as ``User:`` and ``Agent:``; ``role`` says which side is
judged: the last message of that side. Judging an answer ("Agent") should include the user turn it
answers, as Meta's documentation asks.

The prompt's ``<|begin_of_text|>`` is one token for a Llama 3 tokenizer, and that tokenizer also
adds one of its own when a completions server tokenizes the prompt (its ``tokenizer.json`` post-processor
does, and vLLM's ``/v1/completions`` and genserve's local engine both tokenize with it): the model would
see two. ``GuardClassifier`` therefore sends the
prompt without it by default (``bos=False``); set ``bos=True`` for a backend whose tokenizer adds
none.

The scores
----------
For each text the classifier asks the backend for a greedy answer (temperature 0) of at most
``max_category_tokens`` tokens, with the 20 most likely alternatives at each position
(``logprobs=20``), and makes a ``GuardVerdict``:

- ``p_unsafe``: the probability that the answer begins with "unsafe", following the model card
  ("we look at the probability for the first token, and use that as the 'unsafe' class
  probability"): the sum of ``exp(logprob)`` over the first position's alternatives whose text,
  leading whitespace stripped, is a non-empty prefix of ``unsafe`` and not of ``safe``. Llama 3's
  tokenizer has ``unsafe`` (and ``safe``) as one token, so there the sum is that token's
  probability. Other tokenizers split the word (``un`` + ``safe``), and a first token ``u`` or ``un``
  could go on to something other than "unsafe" (``unknown``): for them the sum is an upper bound of
  the probability of the word, and it counts only what the 20 alternatives show (a lower bound of
  the matching tokens' mass when more than 20 tokens are likely). Matching is case-sensitive:
  Llama Guard answers in lower case. An upstream that reports alternatives as a map from text to
  logprob (OpenAI's completions format) merges tokens whose text is the same. A backend that
  reports no logprobs at all gets 1 when the greedy answer begins with ``unsafe``, else 0.
- ``s_codes``: the codes parsed from the greedy answer: after a first word ``unsafe``, every
  ``S1``..``S14`` in the rest, in order, without repeats. A ``safe`` answer, or one that is neither
  (garbage, a truncated answer), has none.
- ``scores``: all 13 OpenAI categories (``categories.full_scores``): each category that a parsed
  code maps to (``S_TO_OPENAI``, plus the role's additions in ``ROLE_EXTRA``) gets ``p_unsafe``,
  every other category 0. A verdict is expressed only through these categories: when the greedy
  answer is ``safe``, every score is 0 even if ``p_unsafe`` is not, and ``p_unsafe`` is reported
  apart, so that a caller may still flag on a threshold of its own over it.
- ``extra``: codes with no OpenAI counterpart (S6 Specialized Advice, S7 Privacy, S8 Intellectual
  Property, S13 Elections) that the answer named, each with ``p_unsafe``. They do not enter
  ``scores``, so they flag nothing by themselves; the service may report or act on them.

Texts are classified concurrently, one request each. A backend's error propagates unchanged: a text
whose prompt does not fit the guard model's context raises that backend's ``InvalidRequestError``
(genserve's local engine) or upstream error (a remote server), which the moderation service treats
as a failure of this classifier.

Running one
-----------
Any text backend serves the guard model. On a GPU node, vLLM (``vllm serve
meta-llama/Llama-Guard-3-1B``) and a ``remote`` registry entry pointing at it::

    - id: llama-guard
      modality: text
      backend: remote
      url: http://gpu-node:8000/v1
      upstream_model: meta-llama/Llama-Guard-3-1B

or a ``local`` text entry (``family: llama``) whose ``source`` is a directory holding such weights
in Hugging Face's layout. ``GuardClassifier(backend)`` is then built on that entry's backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from genserve.app.backends.base import Delta, TextBackend
from genserve.app.moderation.categories import Category, full_scores
from genserve.models.params import SamplingParams, TextParams

__all__ = [
    "LLAMA_GUARD_3_1B_CATEGORIES",
    "LLAMA_GUARD_3_CATEGORIES",
    "ROLE_EXTRA",
    "S_TO_OPENAI",
    "GuardClassifier",
    "GuardVerdict",
    "guard_prompt",
    "is_unsafe_start",
    "p_unsafe_from_top",
    "parse_codes",
    "verdict",
]

Role = Literal["User", "Agent"]

# The category lines of Llama Guard 3's prompt (its chat template's default, as in Meta's prompt
# format). The model card's taxonomy spells some longer (S3 "Sex-Related Crimes", S4 "Child Sexual
# Exploitation", S11 "Suicide & Self-Harm"); the prompt the model was trained on uses these.
LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}
# Llama Guard 3-1B was trained on S1-S13 (its model card); S14 is the 8B's.
LLAMA_GUARD_3_1B_CATEGORIES: dict[str, str] = {k: v for k, v in LLAMA_GUARD_3_CATEGORIES.items() if k != "S14"}

# Each hazard code's OpenAI categories (a parent such as "sexual" follows from its child through
# ``full_scores``). The choices:
#   S1  Violent Crimes: enabling or endorsing violence against people or animals is "violence", and
#       advice on violent wrongdoing is "illicit/violent".
#   S2  Non-Violent Crimes (fraud, theft, drugs, unlicensed weapons, hacking): "illicit".
#   S3  Sex-Related Crimes (trafficking, sexual assault, sexual harassment, prostitution): "sexual"
#       (OpenAI's includes promoting sexual services) and "illicit" (enabling a crime). Not
#       "harassment": OpenAI's means harassing language towards a target, which S3 need not contain.
#   S4  Child Sexual Exploitation: "sexual/minors".
#   S5  Defamation (false statements that injure a living person's reputation): "harassment", the
#       nearest OpenAI category, content aimed at a person; a loose fit.
#   S6  Specialized Advice, S7 Privacy, S8 Intellectual Property, S13 Elections: no OpenAI category
#       covers them: () here, reported in ``GuardVerdict.extra`` instead.
#   S9  Indiscriminate Weapons (chemical, biological, nuclear, high-yield explosives):
#       "illicit/violent" (weapons and violent wrongdoing) and "violence".
#   S10 Hate: "hate".
#   S11 Suicide & Self-Harm: "self-harm"; ``ROLE_EXTRA`` adds "self-harm/intent" for a user's message
#       (a person asking about or speaking of hurting themselves) and "self-harm/instructions" for a
#       model's answer (S11 answers enable or encourage self-harm, which is what OpenAI's
#       instructions category covers: encouragement, instructions or advice).
#   S12 Sexual Content (erotica): "sexual".
#   S14 Code Interpreter Abuse (denial of service, container escapes, privilege escalation): a cyber
#       crime, "illicit".
S_TO_OPENAI: dict[str, tuple[Category, ...]] = {
    "S1": ("violence", "illicit/violent"),
    "S2": ("illicit",),
    "S3": ("sexual", "illicit"),
    "S4": ("sexual/minors",),
    "S5": ("harassment",),
    "S6": (),
    "S7": (),
    "S8": (),
    "S9": ("illicit/violent", "violence"),
    "S10": ("hate",),
    "S11": ("self-harm",),
    "S12": ("sexual",),
    "S13": (),
    "S14": ("illicit",),
}
ROLE_EXTRA: dict[tuple[str, Role], tuple[Category, ...]] = {
    ("S11", "User"): ("self-harm/intent",),
    ("S11", "Agent"): ("self-harm/instructions",),
}
_SPEAKER = {"user": "User", "assistant": "Agent"}
_CODE = re.compile(r"\bS(1[0-4]|[1-9])\b")
_UNSAFE = re.compile(r"\s*unsafe\b")
TOP_LOGPROBS = 20  # the most alternatives genserve's engine reports per position


def guard_prompt(conversation: Sequence[Mapping[str, str]], role: Role, *,
                 categories: Mapping[str, str] | None = None, bos: bool = True) -> str:
    """Llama Guard 3's prompt judging the last ``role`` message of ``conversation`` (``user`` and
    ``assistant`` turns), with ``categories`` (code -> text, default: all 14), as one text for
    ``/v1/completions``; ``bos=False`` leaves out the leading ``<|begin_of_text|>`` for a backend
    whose tokenizer adds it (module docstring)."""
    if role not in ("User", "Agent"):
        raise ValueError(f"role must be 'User' or 'Agent', got {role!r}")
    if not conversation:
        raise ValueError("the conversation is empty")
    turns = []
    for i, message in enumerate(conversation):
        speaker = _SPEAKER.get(message.get("role", ""))
        if speaker is None:
            raise ValueError(f"conversation[{i}]: role must be 'user' or 'assistant', got {message.get('role')!r}")
        turns.append(f"{speaker}: {message.get('content', '').strip()}\n\n")
    cats = LLAMA_GUARD_3_CATEGORIES if categories is None else categories
    return ("<|begin_of_text|>" if bos else "") + (
        "<|start_header_id|>user<|end_header_id|>\n\n"
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
        "policy with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        + "".join(f"{code}: {text}\n" for code, text in cats.items())
        + "<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\n"
        + "".join(turns)
        + "<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories. "
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def is_unsafe_start(token: str) -> bool:
    """Whether a first token begins the answer "unsafe" (module docstring: an approximation)."""
    t = token.lstrip()
    return bool(t) and "unsafe".startswith(t) and not "safe".startswith(t)


def p_unsafe_from_top(top: Sequence[tuple[str, float]]) -> float:
    """``p_unsafe`` from one position's alternatives ``(token text, logprob)``."""
    return min(1.0, sum((math.exp(lp) for tok, lp in top if is_unsafe_start(tok)), 0.0))


def parse_codes(answer: str) -> list[str]:
    """The hazard codes of a guard answer: none unless its first word is ``unsafe``."""
    m = _UNSAFE.match(answer)
    if m is None:
        return []
    return list(dict.fromkeys("S" + n for n in _CODE.findall(answer, m.end())))


@dataclass
class GuardVerdict:
    p_unsafe: float
    s_codes: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=lambda: full_scores({}))  # all 13 categories
    extra: dict[str, float] = field(default_factory=dict)  # codes without an OpenAI category


def verdict(p_unsafe: float, codes: Sequence[str], role: Role) -> GuardVerdict:
    """The verdict of parsed ``codes`` at probability ``p_unsafe`` (module docstring)."""
    partial: dict[str, float] = {}
    extra: dict[str, float] = {}
    for code in codes:
        cats = S_TO_OPENAI.get(code, ()) + ROLE_EXTRA.get((code, role), ())
        if not cats:
            extra[code] = p_unsafe
        for c in cats:
            partial[c] = max(partial.get(c, 0.0), p_unsafe)
    return GuardVerdict(p_unsafe, list(codes), full_scores(partial), extra)


class GuardClassifier:
    """A Llama Guard 3 style classifier on a text backend serving the guard model."""

    def __init__(self, backend: TextBackend, name: str = "guard", max_category_tokens: int = 12, *,
                 categories: Mapping[str, str] | None = None, bos: bool = False) -> None:
        if max_category_tokens < 1:
            raise ValueError("max_category_tokens must be at least 1")
        self.backend = backend
        self.name = name
        self.max_category_tokens = max_category_tokens
        self.categories = dict(LLAMA_GUARD_3_CATEGORIES if categories is None else categories)
        self.bos = bos

    async def classify(self, texts: list[str], role: Role = "User", *,
                       context: Sequence[Mapping[str, str]] = ()) -> list[GuardVerdict]:
        """One verdict per text, in order. Each text is the last message of its conversation: the
        user's (``role="User"``) or the model's (``"Agent"``), after ``context`` (earlier turns,
        such as the prompt an answer replies to)."""
        speaker = "user" if role == "User" else "assistant"
        tasks = [asyncio.ensure_future(self._one([*context, {"role": speaker, "content": t}], role))
                 for t in texts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one failed (or we were cancelled): the others stop, their streams closed
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _one(self, conversation: list[Mapping[str, str]], role: Role) -> GuardVerdict:
        request = TextParams(
            request_id=f"guard-{uuid.uuid4().hex}",
            params=SamplingParams(max_tokens=self.max_category_tokens, temperature=0.0, logprobs=TOP_LOGPROBS),
            prompt=guard_prompt(conversation, role, categories=self.categories, bos=self.bos))
        text: list[str] = []
        first = None
        async with contextlib.aclosing(self.backend.generate(request)) as events:
            async for ev in events:
                if not isinstance(ev, Delta) or ev.index != 0:
                    continue
                text.append(ev.text)
                if first is None and ev.logprobs:
                    first = ev.logprobs[0]
        answer = "".join(text)
        if first is None:  # a backend that reports no logprobs: the greedy answer's word, 0 or 1
            p = 1.0 if _UNSAFE.match(answer) else 0.0
        else:
            top = list(first.top)
            if first.token not in {tok for tok, _ in top}:  # the chosen token, when not among them
                top.append((first.token, first.logprob))
            p = p_unsafe_from_top(top)
        return verdict(p, parse_codes(answer), role)

