"""Training text for ``genserve-text-tiny``, all of it shipped with CPython itself.

Two sources, both under the Python Software Foundation License (PSF-2.0):

- ``pydoc_data.topics``: the language reference topics that ``help()`` shows;
- the docstrings of the standard library's modules, classes and functions, read with ``ast``
  from the ``.py`` sources (nothing is imported, so nothing runs).

From the docstrings we also derive question/answer pairs ("What does json.dumps do?" → the first
paragraph of its docstring) rendered with the chat template, so chat answers stay on topic.
A document goes to the held-out split by a hash of its name, so the split is stable across runs.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = {"test", "tests", "site-packages", "turtledemo", "ensurepip", "__pycache__",
             "pydoc_data"}
QUESTIONS = ("What does {name} do?", "Explain {name}.", "What is {name} for?",
             "How do I use {name}?", "Describe {name} in Python.")


@dataclass(frozen=True)
class Doc:
    name: str
    text: str
    question: str | None = None  # set for chat pairs: ``text`` is then the answer

    @property
    def held_out(self) -> bool:
        return hashlib.sha256(self.name.encode()).digest()[0] < 13  # about 5%


def pydoc_topics() -> Iterator[Doc]:
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        yield Doc(f"topic:{name}", text.strip())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(node.args)
    return f"({args})"


def _docstrings(module: str, tree: ast.Module) -> Iterator[tuple[str, str, str]]:
    """(qualified name, heading, docstring) for the module and its public classes and functions."""
    doc = ast.get_docstring(tree)
    if doc:
        yield module, f"Module {module}", doc
    stack: list[tuple[str, ast.AST]] = [(module, tree)]
    while stack:
        prefix, parent = stack.pop()
        for node in ast.iter_child_nodes(parent):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_") and node.name != "__init__":
                continue
            qual = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if doc:
                    yield qual, f"class {qual}", doc
                stack.append((qual, node))
            elif doc:
                yield qual, f"{qual}{_signature(node)}", doc


def stdlib_docstrings(root: Path | None = None) -> Iterator[tuple[str, str, str]]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        module = ".".join(rel.with_suffix("").parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield from _docstrings(module, tree)


def first_paragraph(doc: str, limit: int = 600) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())[:limit]


def documents() -> list[Doc]:
    docs = list(pydoc_topics())
    for i, (qual, heading, doc) in enumerate(stdlib_docstrings()):
        docs.append(Doc(qual, f"{heading}\n\n{doc.strip()}"))
        answer = first_paragraph(doc)
        if len(answer) > 20:
            question = QUESTIONS[i % len(QUESTIONS)].format(name=qual)
            docs.append(Doc(f"qa:{qual}", answer, question=question))
    return docs
