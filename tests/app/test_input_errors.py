"""A model's ``InputError`` becomes OpenAI's 400 naming the parameter, in one handler (``app/errors.py``)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from genserve.app.errors import install_error_handlers
from genserve.models.errors import InputError
from genserve.models.molecule import chem


def test_an_input_error_is_a_400_with_its_param() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/walk")
    def walk() -> dict:
        raise InputError("end 'C1CC' is not a parsable molecule", "end")

    @app.post("/constraints")
    def constraints() -> dict:
        return {"ok": chem.compile_constraints(chem.Constraints(similarity_min=0.5)) is None}

    with TestClient(app) as client:
        r = client.post("/walk")
        assert r.status_code == 400
        assert r.json() == {"error": {"message": "end 'C1CC' is not a parsable molecule",
                                      "type": "invalid_request_error", "param": "end", "code": None}}
        r = client.post("/constraints")
        assert r.status_code == 400 and r.json()["error"]["param"] == "constraints.similarity_min"


def test_an_error_quoting_a_lone_surrogate_still_encodes() -> None:
    """The 404 for model "x\\ud800" failed to encode its own body (a 500); the message is escaped now."""
    from genserve.app.errors import ModelNotFoundError, error_response

    response = error_response(ModelNotFoundError("The model 'x\ud800' does not exist.", param="model"))
    assert response.status_code == 404
    assert "x\\\\ud800" in response.body.decode("utf-8")
