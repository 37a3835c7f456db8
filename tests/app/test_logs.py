"""The server log's formats (app/logs.py): JSON lines that a log pipeline parses, and the libraries'
chatter kept out below debug."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from genserve.app import logs


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    for name in (*logs.CHATTY, "py.warnings"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_json_lines_carry_time_level_logger_message_and_traceback(restore_logging, capsys) -> None:
    logs.setup("info", "json", quiet=True)
    logging.getLogger("genserve.test").info("ready: %s", "ünïcode")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("genserve.test").exception("failed")
    logging.getLogger("httpx").info("HTTP Request: GET http://upstream/v1/models")  # chatter: dropped
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)  # dropped below debug
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in lines] == [
        ("info", "genserve.test", "ready: ünïcode"), ("error", "genserve.test", "failed")]
    assert lines[0]["time"].endswith("Z") and len(lines[0]["time"]) == len("2026-12-04T06:10:00.123Z")
    assert "ValueError: boom" in lines[1]["exception"] and "exception" not in lines[0]


def test_debug_keeps_the_chatter(restore_logging, capsys) -> None:
    logs.setup("debug", "text", quiet=True)
    logging.getLogger("httpx").info("HTTP Request: GET http://upstream/v1/models")
    assert "INFO httpx: HTTP Request" in capsys.readouterr().err
