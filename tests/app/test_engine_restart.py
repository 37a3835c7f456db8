"""The text engine's restart back-off: 1, 2, 4 ... 60 s between attempts while an engine keeps dying
soon after it starts, starting over after one that had served a good while (the count never reset,
so a long-lived server came to wait a minute after every rare crash)."""

from __future__ import annotations

from genserve.app.backends.local_text import RESTART_BACKOFF_RESET_S, restarts_after_exit


def test_a_crash_after_a_long_run_starts_the_back_off_over() -> None:
    assert restarts_after_exit(5, RESTART_BACKOFF_RESET_S + 1) == 0


def test_a_crash_loop_keeps_backing_off() -> None:
    assert restarts_after_exit(5, 2.0) == 5
    assert restarts_after_exit(0, 0.5) == 0
