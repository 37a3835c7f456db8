"""The watermark secret: ``GENSERVE_WATERMARK_KEY``, else a random one genserve keeps in its state
directory, made on first start (mode 0600), so outputs stay detectable across restarts."""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KEY_FILE = "watermark.key"


def watermark_secret(configured: str | None, state_dir: Path) -> str:
    if configured:
        return configured
    path = state_dir / KEY_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then linked into place, which fails if a key is there:
    # two servers starting together on one state directory end up with one key, never a half-written one.
    fd, name = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=state_dir)  # mode 0600
    tmp = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        return _read(path)
    finally:
        tmp.unlink()
    log.warning("made a watermark key in %s: outputs are detectable by this server and any given the same "
                "key; give every replica one key (GENSERVE_WATERMARK_KEY) and keep it secret", path)
    return _read(path)


def _read(path: Path) -> str:
    secret = path.read_text().strip()
    if not secret:  # emptied by hand: refuse rather than key on ""
        raise RuntimeError(f"the watermark key file {path} is empty; delete it to make a new one, or set "
                           "GENSERVE_WATERMARK_KEY")
    return secret
