"""The hold-back gate: a blocked phrase placed at every split point, chunked every way, never leaves.

These drive the real ``TextStream`` of the real ``ModerationService`` (every text tier plus the policy's
blocked terms); ``tests/e2e/test_moderation_stream.py`` does the same through the server and the engine.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from genserve.app.metrics import Metrics
from genserve.app.moderation.policy import Policy
from genserve.app.moderation.service import ModerationService

TERM = "purple walrus"
BENIGN = ("Once upon a time a small fox walked to the river, looked at the water and thought about "
          "the long winter ahead. ")


def service(**policy: object) -> ModerationService:
    return ModerationService(Policy(blocked_terms=(TERM,), **policy), [], Metrics())


async def drive(svc: ModerationService, chunks: list[str]) -> tuple[str, bool]:
    """Feeds ``chunks`` as one choice's deltas; returns (what was released, whether it was blocked)."""
    stream = svc.text_stream("m", None)
    assert stream is not None
    out = ""
    for c in chunks:
        r = await stream.feed(0, c, None, 1)
        if stream.is_blocked(0):
            return out, True
        out += r.text if r else ""
    r = await stream.finish(0)
    return out + (r.text if r else ""), stream.is_blocked(0)


def splits(text: str) -> list[list[str]]:
    """Every way to cut ``text`` in two, one character at a time, and seeded random chunkings."""
    out = [[text[:i], text[i:]] for i in range(1, len(text))]
    out.append(list(text))
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(2, 12))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


@pytest.mark.parametrize("place", [0, 7, len(BENIGN) - 1, len(BENIGN)], ids=lambda p: f"at{p}")
def test_a_blocked_term_never_leaves_at_any_split(place: int) -> None:
    svc = service()
    text = BENIGN[:place] + " " + TERM + " " + BENIGN[place:] + BENIGN
    start = place + 1
    leaks = 0
    for chunks in splits(text):
        released, blocked = asyncio.run(drive(svc, chunks))
        assert blocked
        leaks += len(released) > start  # any character of the phrase (or after it) released
        assert text.startswith(released)
    assert leaks == 0


@pytest.mark.parametrize("disguise", [
    "PURPLE   WALRUS", "purp\u200ble wal\u200drus", "ｐｕｒｐｌｅ ｗａｌｒｕｓ", "purp|e wa|rus", "Purple, walrus",
], ids=["case-space", "zero-width", "fullwidth", "leet", "punct"])
def test_disguised_terms_are_held_too(disguise: str) -> None:
    svc = service()
    text = BENIGN + disguise + " " + BENIGN
    for chunks in splits(text)[:: max(1, len(text) // 60)]:
        released, blocked = asyncio.run(drive(svc, chunks))
        assert blocked, chunks
        assert len(released) <= len(BENIGN)


def test_benign_text_is_released_whole_whatever_the_chunking() -> None:
    svc = service()
    text = BENIGN * 3 + "An assertion passed in class."  # 'ass' inside words is no term of any list
    for chunks in splits(text)[::7]:
        released, blocked = asyncio.run(drive(svc, chunks))
        assert not blocked
        assert released == text


def test_nothing_within_the_window_is_released_before_the_end() -> None:
    svc = service(holdback_chars=48)
    stream = svc.text_stream("m", None)
    assert stream is not None
    held = asyncio.run(stream.feed(0, "x " * 20, None, 1))  # 40 characters: all look-ahead
    assert held is None or held.text == ""


def test_window_shorter_than_a_term_is_refused() -> None:
    with pytest.raises(ValueError, match="holdback_chars"):
        Policy(blocked_terms=("a rather long blocked phrase here",), holdback_chars=8)


def test_a_failing_classifier_fails_closed() -> None:
    class Broken:
        name = "broken"

        def scores(self, text: str) -> dict[str, float]:
            raise RuntimeError("model file missing")

    svc = service()
    svc.__dict__["tiers"] = (Broken(),)
    released, blocked = asyncio.run(drive(svc, [BENIGN]))
    assert blocked and released == ""
    svc_open = ModerationService(Policy(on_error="fail_open"), [], Metrics())
    svc_open.__dict__["tiers"] = (Broken(),)
    released, blocked = asyncio.run(drive(svc_open, [BENIGN]))
    assert not blocked and released == BENIGN


def test_a_halt_blocks_the_choice_and_audits_its_held_text(caplog: pytest.LogCaptureFixture) -> None:
    """The backend's own check (``SamplingParams.halt``) stopped a choice: nothing more of it goes out,
    the other choice is untouched, and the audit line carries the text that was held (when the policy
    logs content)."""
    svc = service(log_content=True)
    stream = svc.text_stream("m", None)
    assert stream is not None and stream.halt is not None and stream.halt.terms == (TERM,)

    async def run() -> None:
        assert await stream.feed(0, "a short held text", None, 1) is None  # all of it within the window
        with caplog.at_level("INFO", logger="genserve.moderation.audit"):
            stream.halted(0)
        assert stream.is_blocked(0) and await stream.feed(0, BENIGN * 3, None, 1) is None
        assert await stream.finish(0) is None
        assert not stream.is_blocked(1) and (await stream.feed(1, BENIGN * 3, None, 1)) is not None

    asyncio.run(run())
    (line,) = [r.getMessage() for r in caplog.records if "moderation_flag" in r.getMessage()]
    assert '"content": "a short held text"' in line and '"action": "blocked"' in line
