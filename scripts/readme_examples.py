"""README.md's example requests and their real outputs, run against a live genserve.

Each example whose output README.md shows sits between two HTML comments, which Markdown renders as
nothing::

    <!-- readme-example: NAME -->
    ```bash
    curl ... (the request of EXAMPLES[NAME], as sent)
    # {... the response, as below}
    ```
    <!-- /readme-example -->

The whole block between the markers is generated here, the request included, so the command shown
is the one that was run. Regenerate README.md against a server of the built-in registry (it serves
every example's model), or check it (exit status 1 and a diff where it differs; tests/e2e/test_readme.py
runs that against the test servers)::

    genserve serve &
    python scripts/readme_examples.py --url http://127.0.0.1:8000 --write
    python scripts/readme_examples.py --url http://127.0.0.1:8000 --check

``--url`` may be repeated as ``--url MODALITY=URL`` to send one modality's examples (``text``,
``embedding`` or ``molecule``) to another server. Every example is greedy, seeded or deterministic, so
every server gives the same output (the chat example is greedy because sampled text is watermarked
with each server's own key), and the response is shown after these rules, in this order:

- the response's own ``id`` keeps its prefix (``chatcmpl-...``, ``mol-...``) and its ``created``
  time is shown as ``...``: both differ on every call;
- floats are rounded to 4 decimals;
- a list or a string under a key an example names in ``cut`` keeps its first items or characters,
  then ``...``.

Outputs of sampled models (text, molecules) depend on the server's arithmetic as well as on the
seed: README.md shows those of a CPU server in float32 (genserve's ``dtype: auto`` on a CPU without
native bfloat16). On a GPU, or a CPU with AVX512-BF16 or AMX, regenerate with ``dtype: float32`` set
on genserve-text-tiny and genserve-mol in a ``--config`` file, or the check fails there.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

README = Path(__file__).resolve().parent.parent / "README.md"
SHOWN_URL = "http://127.0.0.1:8000"  # the address README.md's commands use, whatever --url is
WIDTH = 110  # characters per line of a generated block
MARKED = re.compile(r"<!-- readme-example: (\S+) -->\n(.*?)\n?<!-- /readme-example -->", re.DOTALL)


@dataclass(frozen=True)
class Example:
    name: str
    modality: str  # which --url it is sent to
    path: str
    body: dict[str, Any]
    cut: dict[str, int] = field(default_factory=dict)  # key: items (characters) kept of the list (string) under it


EXAMPLES = {e.name: e for e in [
    Example("chat", "text", "/v1/chat/completions", {
        "model": "genserve-text-tiny", "messages": [{"role": "user", "content": "What does os.path.join do?"}],
        "max_tokens": 48, "temperature": 0}),  # greedy: sampled text carries each server's own watermark
    Example("embeddings", "embedding", "/v1/embeddings",
            {"model": "all-minilm-l6-v2", "input": ["a red apple", "a green pear"]}, cut={"embedding": 4}),
    Example("molecules", "molecule", "/v1/molecules/generations", {
        "model": "genserve-mol", "n": 5, "seed": 7,
        "constraints": {"qed_min": 0.6, "substructure": "c1ccncc1", "mw_max": 330}, "include": ["properties"]},
        cut={"data": 2, "selfies": 24}),
]}


def flat(value: Any) -> str:
    """JSON on one line, ``...`` standing for what was left out."""
    if value is Ellipsis:
        return "..."
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(flat, value)) + "]"
    return json.dumps(value, ensure_ascii=False)


def rows(value: dict | list, column: int, width: int = WIDTH) -> list[str]:
    """The items of ``value`` for lines starting at ``column``: packed onto one line while they fit in
    ``width``, an item too long for a line of its own broken the same way inside its brackets."""
    if isinstance(value, dict):
        items = [(f"{json.dumps(k)}: ", v) for k, v in value.items()]
    else:
        items = [("", v) for v in value]
    out: list[str] = []
    packable = False  # whether out[-1] is one line with room for more
    for prefix, item in items:
        text = prefix + flat(item)
        if packable and column + len(out[-1]) + len(text) + 4 <= width:
            out[-1] += ", " + text
        elif column + len(text) + 2 <= width or not isinstance(item, dict | list) or not item:
            out.append(text)
            packable = True
        else:
            out.append(prefix + render(item, column + len(prefix), width))
            packable = False
    return out


def render(value: Any, column: int = 0, width: int = WIDTH) -> str:
    """JSON for README.md in lines of ``width``, the first starting at ``column``."""
    if not isinstance(value, dict | list) or column + len(flat(value)) <= width:
        return flat(value)
    opener, closer = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opener + (",\n" + " " * (column + 1)).join(rows(value, column + 1, width)) + closer


def shown(response: dict[str, Any], cut: dict[str, int]) -> dict[str, Any]:
    """The response as README.md shows it (the rules of the module docstring)."""
    def walk(value: Any, key: str = "") -> Any:
        keep = cut.get(key)
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [walk(v) for v in value[:keep]]
            return [*items, ...] if keep is not None and len(value) > keep else items
        if isinstance(value, str) and keep is not None and len(value) > keep:
            return value[:keep] + "..."
        return round(value, 4) if isinstance(value, float) else value

    out = walk(response)
    if "id" in out:
        out["id"] = out["id"].split("-")[0] + "-..."
    if "created" in out:
        out["created"] = ...
    return out


def command(example: Example) -> str:
    """The curl command README.md shows for ``example``."""
    head = f"curl {SHOWN_URL}{example.path} -H 'Content-Type: application/json' -d '"
    if len(head) + len(flat(example.body)) + 1 <= WIDTH:
        return head + flat(example.body) + "'"
    return head + "{\n  " + ",\n  ".join(rows(example.body, 2)) + "}'"


def block(example: Example, response: dict[str, Any]) -> str:
    """The Markdown between an example's markers: its curl command and, as comments, what came back."""
    output = "\n".join("# " + line for line in render(shown(response, example.cut), 0, WIDTH - 2).splitlines())
    return f"```bash\n{command(example)}\n{output}\n```"


def run(example: Example, urls: dict[str, str], api_key: str | None) -> dict[str, Any]:
    url = urls.get(example.modality) or urls.get("")
    if url is None:
        sys.exit(f"no --url for {example.modality} (example {example.name!r})")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(url.rstrip("/") + example.path, json=example.body, headers=headers, timeout=120)
    if r.status_code != 200:
        sys.exit(f"example {example.name!r}: {r.status_code} from {url}: {r.text}")
    return r.json()


def regenerate(text: str, urls: dict[str, str], api_key: str | None) -> str:
    """``text`` (README.md) with every marked block made again from its example's real output."""
    names = MARKED.findall(text)
    unknown = sorted({name for name, _ in names} - EXAMPLES.keys())
    missing = sorted(EXAMPLES.keys() - {name for name, _ in names})
    if unknown or missing:
        sys.exit(f"README markers without an example: {unknown}; examples without a marker: {missing}")

    def redo(match: re.Match[str]) -> str:
        example = EXAMPLES[match[1]]
        return (f"<!-- readme-example: {example.name} -->\n{block(example, run(example, urls, api_key))}\n"
                "<!-- /readme-example -->")

    return MARKED.sub(redo, text)


def parse_urls(values: list[str]) -> dict[str, str]:
    """``--url URL`` (every example) and ``--url MODALITY=URL`` (that modality's) as {modality or '': URL}."""
    urls = {}
    for value in values:
        modality, _, url = value.partition("=") if "=" in value.split("://")[0] else ("", "", value)
        urls[modality] = url
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", required=True,
                        help="server base URL for every example, or MODALITY=URL for one modality's")
    parser.add_argument("--api-key", default=os.environ.get("GENSERVE_API_KEY"),
                        help="the server's API key, if it has keys (default: GENSERVE_API_KEY)")
    parser.add_argument("--readme", type=Path, default=README)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the marked blocks of the README")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff if the README differs")
    args = parser.parse_args(argv)
    old = args.readme.read_text()
    new = regenerate(old, parse_urls(args.url), args.api_key)
    if args.write:
        if new != old:
            args.readme.write_text(new)
        print(f"{args.readme}: {'rewritten' if new != old else 'up to date'}")
        return 0
    diff = list(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(args.readme), "generated"))
    sys.stdout.writelines(diff)
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
