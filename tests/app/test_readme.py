"""What people read before any code: the CLI's help is plain text, and README.md's example requests
are the ones ``scripts/readme_examples.py`` runs (their outputs: ``tests/e2e/test_readme.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from genserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "scripts" / "readme_examples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parsers() -> dict[str, argparse.ArgumentParser]:
    top = build_parser()
    (sub,) = (a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"genserve": top} | {f"genserve {name}": p for name, p in sub.choices.items()}


@pytest.mark.parametrize("command", list(parsers()))
def test_cli_help_is_plain_text(command: str) -> None:
    text = parsers()[command].format_help()
    for markup in ("``", ":class:`", ":func:`", ":mod:`", ":meth:`"):
        assert markup not in text, f"{command} --help shows reStructuredText {markup!r}:\n{text}"


def test_top_level_help_shows_examples() -> None:
    text = build_parser().format_help()
    assert "examples:\n  genserve serve " in text


def test_readme_marks_every_example_and_shows_its_request() -> None:
    script = load_script()
    readme = (ROOT / "README.md").read_text()
    marked = dict(script.MARKED.findall(readme))
    assert marked.keys() == script.EXAMPLES.keys()
    for name, example in script.EXAMPLES.items():
        assert marked[name].startswith(f"```bash\n{script.command(example)}\n# "), name
        assert marked[name].endswith("\n```"), name
