"""schemathesis hooks for tests/e2e/test_openapi_fuzz.py (loaded through ``SCHEMATHESIS_HOOKS``).

Valid requests must reach a model. The document lets ``model`` be any string (one document serves every
registry), so generated cases would name models the server lacks and stop at 404, and the positive
checks would test little past the lookup. ``GENSERVE_FUZZ_MODELS`` (JSON: an operation's path to the
models that serve it, from the server's ``/v1/models``) narrows ``model`` to those models in the
document schemathesis reads: its valid cases then name a real model, and its invalid ones still try
every other string.
"""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis


@schemathesis.hook
def before_load_schema(ctx: Any, raw_schema: dict[str, Any]) -> None:
    models: dict[str, list[str]] = json.loads(os.environ.get("GENSERVE_FUZZ_MODELS", "{}"))
    components = raw_schema.get("components", {}).get("schemas", {})
    for path, ids in models.items():
        body = raw_schema["paths"][path]["post"]["requestBody"]["content"]
        for media in body.values():
            schema = media["schema"]
            if "$ref" in schema:
                schema = components[schema["$ref"].rsplit("/", 1)[1]]
            field = schema["properties"]["model"]
            narrowed: dict[str, Any] = {"type": "string", "enum": ids}
            if {"type": "null"} in field.get("anyOf", []):  # optional (moderations): null stays valid
                narrowed = {"anyOf": [narrowed, {"type": "null"}]}
            schema["properties"]["model"] = {**narrowed, **{k: v for k, v in field.items()
                                                           if k in ("description", "default", "title")}}
