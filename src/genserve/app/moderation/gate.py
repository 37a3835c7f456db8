"""The hold-back gate: a stream releases only text that has been checked with ``window`` characters of
look-ahead.

One ``HoldBack`` per choice, free of I/O (the service drives it and runs the checks). Text arrives in
deltas of any size; the gate keeps it all and answers two questions:

- ``pending()``: the span to check after each delta: from ``window`` normalised characters before the
  released point (so consecutive checks overlap) to the end, so a phrase is caught on the delta that
  completes it.
- ``release(span)``: after that span passed, what may go out: everything but the last ``window``
  normalised characters, which wait for the text after them.

Why that is enough: a blocked phrase of at most ``window`` normalised characters that starts before the
release point ends inside the checked span, so it is seen whole before its first character can leave;
and one that starts after the release point is still held. The window is counted in *normalised*
characters (``text.normalize``: NFKC, case, leetspeak, format characters removed), so padding a phrase
with zero-width characters does not stretch it past the window. At the end of the choice, ``final()``
gives the whole unreleased tail (with its context) to check, and everything goes out if it passes.

Logprobs and token counts travel with the text: each delta's are released with its last character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from genserve.app.moderation.text import normalize, written_to


@dataclass
class Span:
    """Text to check: ``text`` is ``buf[start:]``; passing it releases ``buf[:release_to]``."""

    text: str
    start: int
    release_to: int
    context_from: int  # where the next check starts (``window`` normalised characters before release_to)


@dataclass
class Released:
    text: str
    logprobs: list = field(default_factory=list)
    num_tokens: int = 0


@dataclass
class HoldBack:
    window: int
    batch: int = 1  # characters that must be releasable before a check releases any (fewer, larger checks)
    buf: str = ""
    released: int = 0  # buf[:released] has gone out
    context_from: int = 0  # start of the next check
    checked_to: int = 0  # the furthest end of any span that passed
    _marks: list[tuple[int, list, int]] = field(default_factory=list)  # (end offset, logprobs, tokens)

    def push(self, text: str, logprobs: list | None = None, num_tokens: int = 0) -> None:
        self.buf += text
        if logprobs or num_tokens:
            self._marks.append((len(self.buf), list(logprobs or []), num_tokens))

    def pending(self) -> Span:
        """The span to check now: every character since the last check's context, so a blocked phrase is
        seen on the delta that completes it (and generation can stop at once); ``release_to`` is where the
        text may go out to if it passes (``released`` while all unreleased text is look-ahead).

        A word still being written is left out ("ass" may become "assert"): the span ends at the last
        word boundary, and nothing past the span's end is released."""
        start = self.context_from
        text = self.buf[start:written_to(self.buf, start)]
        tail = self.buf[self.released:]
        # The common case needs no normalisation: normalising ASCII never makes it longer (only NFKC on
        # other characters can), so an ASCII tail too short in raw characters is too short normalised.
        if len(tail) < self.window + self.batch and tail.isascii():
            return Span(text, start, self.released, start)
        norm, where = normalize(text)
        q = len(norm) - self.window  # normalised position of the release point
        if q <= 0 or start + where[q] < self.released + self.batch:
            return Span(text, start, self.released, start)
        return Span(text, start, start + where[q], start + where[max(0, q - self.window)])

    def final(self) -> Span:
        """The whole unreleased tail with its context: checked once the choice has ended."""
        return Span(self.buf[self.context_from:], self.context_from, len(self.buf), self.context_from)

    def release(self, span: Span) -> Released:
        """``span`` passed its check: the text (and logprobs) up to its release point."""
        if span.start > self.context_from or span.start > self.released:
            raise ValueError("span does not cover the text since the last release")  # a bug, never a caller's
        self.checked_to = max(self.checked_to, span.start + len(span.text))
        upto = min(span.release_to, self.checked_to)
        out = Released(self.buf[self.released:upto])
        while self._marks and self._marks[0][0] <= upto:
            _, lps, n = self._marks.pop(0)
            out.logprobs += lps
            out.num_tokens += n
        self.released = max(self.released, upto)
        self.context_from = max(self.context_from, min(span.context_from, self.released))
        return out

    @property
    def held(self) -> int:
        return len(self.buf) - self.released
