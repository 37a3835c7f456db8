"""The OpenAPI document as the server behaves: FastAPI's, with what it claims and genserve never does
taken out.

- **No 422.** FastAPI documents a 422 ``HTTPValidationError`` on every operation with parameters;
  genserve answers every invalid request with a 400 in OpenAI's error body (``errors.py``), which
  each router documents (``routers/responses.py``). The 422 responses and their two schemas go.
- **Multipart bodies are one flat object whose fields are never null.** FastAPI describes a form model
  beside its files as ``allOf: [{"$ref": model}]`` plus the files, which form encoders and generators
  read poorly (one sent no ``model``), so the model's properties and required names are written into the
  body's schema. And a form field is text or absent: the pydantic model's ``anyOf: [..., {"type":
  "null"}]``, which no client can send (a generator sends the text ``"null"``, a 400), loses its null
  branch.
- **The key's lock is where the key check is.** Every operation that ``ApiKeyMiddleware`` guards
  (``security.is_open`` false for its path) names the ``APIKey`` bearer scheme, from the same rule, so
  the document and the server cannot disagree. No route declares a security dependency for it: FastAPI
  would solve one on every request only for the document's sake.

``tests/e2e/test_openapi_fuzz.py`` holds the document to the server with schemathesis: every operation,
positive and negative cases, no server error, no undocumented status or content type, no response off
its schema.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from genserve.app.security import SECURITY_SCHEME, is_open

FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """``app.openapi``: FastAPI's document, made honest (module docstring), built once."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEME)
        for path, operations in doc.get("paths", {}).items():
            for operation in operations.values():
                if not is_open(path):
                    operation["security"] = [{name: []} for name in SECURITY_SCHEME]
                operation.get("responses", {}).pop("422", None)
                form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if form is not None:
                    form["schema"] = _flat_form(form["schema"], doc)
        schemas = doc.get("components", {}).get("schemas", {})
        for name in FASTAPI_VALIDATION_SCHEMAS:
            schemas.pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


def _component(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref is not None else schema


def _flat_form(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """A multipart body's schema as one object: the properties and required names of the components it
    extends (``allOf``) and its own, with no null branches."""
    schema = _component(schema, doc)
    flat: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    for part in [*(_component(p, doc) for p in schema.get("allOf", [])), schema]:
        flat["properties"].update(copy.deepcopy(part.get("properties", {})))  # the components stay as they are
        flat["required"] += [name for name in part.get("required", []) if name not in flat["required"]]
    for prop in flat["properties"].values():
        branches = prop.get("anyOf")
        if branches is not None:
            kept = [b for b in branches if b != {"type": "null"}]
            del prop["anyOf"]
            if len(kept) == 1:
                prop.update(kept[0])
            else:
                prop["anyOf"] = kept
        if "default" in prop and prop["default"] is None:
            del prop["default"]
    flat["title"] = schema.get("title", "Form")
    return flat
