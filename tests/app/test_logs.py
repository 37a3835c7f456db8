"""The server log's formats (app/logs.py): JSON lines that a log pipeline parses, and the libraries'
chatter kept out below debug."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest

from genserve.app import logs


@pytest.fixture
def restore_logging():
    """(tests/conftest.py's logging_state restores it afterwards) from a clean start: warnings not captured."""
    logging.captureWarnings(False)


def test_json_lines_carry_time_level_logger_message_and_traceback(restore_logging, capsys) -> None:
    logs.setup("info", "json", quiet=True)
    logging.getLogger("genserve.test").info("ready: %s", "ünïcode")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("genserve.test").exception("failed")
    logging.getLogger("httpx").info("HTTP Request: GET http://upstream/v1/models")  # chatter: dropped
    # a library's notice about its own future is dropped; any other warning is a log line
    warnings.warn_explicit("a library's deprecation", FutureWarning, "diffusers/x.py", 1, module="diffusers.x")
    warnings.warn_explicit("coroutine 'x' was never awaited", RuntimeWarning, "genserve/x.py", 2,
                           module="genserve.x")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["logger"], r["message"].splitlines()[0]) for r in lines] == [
        ("info", "genserve.test", "ready: ünïcode"), ("error", "genserve.test", "failed"),
        ("warning", "py.warnings", "genserve/x.py:2: RuntimeWarning: coroutine 'x' was never awaited")]
    assert lines[0]["time"].endswith("Z") and len(lines[0]["time"]) == len("2026-12-04T06:10:00.123Z")
    assert "ValueError: boom" in lines[1]["exception"] and "exception" not in lines[0]


def test_debug_keeps_the_chatter(restore_logging, capsys) -> None:
    logs.setup("info", "text", quiet=True)  # as an earlier serve in the same process left it
    logs.setup("debug", "text", quiet=True)
    logging.getLogger("httpx").info("HTTP Request: GET http://upstream/v1/models")
    assert "INFO httpx: HTTP Request" in capsys.readouterr().err


def test_a_spawned_child_logs_as_the_server_does(restore_logging, capsys, monkeypatch) -> None:
    """The text engines run in child processes: in a JSON log their lines are JSON too."""
    monkeypatch.delenv(logs.CHILD_ENV, raising=False)
    logs.setup("info", "json", quiet=True)
    child_env = os.environ[logs.CHILD_ENV]
    logs.setup("info", "text")  # as a fresh child process starts: nothing configured yet
    capsys.readouterr()
    monkeypatch.setenv(logs.CHILD_ENV, child_env)
    logs.setup_child()
    logging.getLogger("genserve.app.backends.engine_process").error("engine step failed")
    line = json.loads(capsys.readouterr().err)
    assert (line["level"], line["logger"], line["message"]) == ("error", "genserve.app.backends.engine_process",
                                                                 "engine step failed")
