"""The OpenAPI document's rewrites (app/openapi.py) change the operations they are for and nothing else."""

from __future__ import annotations

from genserve.app.main import create_app
from genserve.app.settings import Settings


def test_a_flat_form_drops_its_null_branches_and_leaves_the_component_as_pydantic_made_it() -> None:
    doc = create_app(Settings(api_keys=["k"]), entries=[]).openapi()
    form = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["size"] == {"title": "Size", "type": "string", "pattern": r"^(auto|\d{1,5}x\d{1,5})$"}
    assert "model" in form["required"] and "allOf" not in form
    component = doc["components"]["schemas"]["ImageEditForm"]["properties"]["size"]
    assert {"type": "null"} in component["anyOf"]  # edited in place before: the form's rewrite leaked into it
