"""The server's log: one format for genserve's, uvicorn's and the libraries' lines (text, or one JSON
object a line for a log pipeline), and the libraries' chatter (per-request INFO lines, progress bars,
their deprecation notices) kept out of it unless the level is ``debug``. The engines' child processes
log the same way (``setup_child``)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that speak at INFO about things an operator need not see: every HTTP call a remote backend
# or the hub client makes, file locks, model-loading chatter.
CHATTY = ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub", "sentence_transformers",
          "transformers", "diffusers", "torch", "matplotlib", "PIL", "multipart", "numexpr")
# Read by the libraries when they are first imported (the engine's child processes inherit them).
# Progress bars off; the libraries keep their warnings (a model's weights "newly initialized" matters).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "warning",
             "DIFFUSERS_VERBOSITY": "warning", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
# Python warnings the libraries raise about their own future: nothing an operator can act on.
LIBRARIES = r"(torch|transformers|diffusers|sentence_transformers|huggingface_hub|tokenizers|hatesonar|rdkit)(\.|$)"


class JsonFormatter(logging.Formatter):
    """``{"time": "2026-12-04T06:10:00.123Z", "level": "info", "logger": ..., "message": ...}``, plus
    ``exception`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out = {"time": when.replace("+00:00", "Z"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


CHILD_ENV = "_GENSERVE_CHILD_LOG"  # "level:format:quiet", for the processes the server spawns


def setup(level: str, fmt: str = "text", quiet: bool = False) -> None:
    """The root handler every logger (uvicorn's too: it is given no config of its own) writes through;
    ``quiet`` (serving, unless at debug level): the libraries' chatter off. Child processes (the text
    engines) inherit the choice through ``CHILD_ENV`` and call :func:`setup_child`."""
    os.environ[CHILD_ENV] = f"{level}:{fmt}:{int(quiet)}"
    quiet = quiet and level.lower() != "debug"
    if quiet:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become log lines, in the log's format
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)
    if quiet:  # the libraries' deprecation notices; genserve's own and every other warning stay
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES)


def setup_child() -> None:
    """In a process the server spawned: the server's level, format and quieting, so that a JSON log
    stays one JSON object a line."""
    level, fmt, quiet = (os.environ.get(CHILD_ENV) or "warning:text:1").split(":")
    setup(level, fmt, quiet == "1")
