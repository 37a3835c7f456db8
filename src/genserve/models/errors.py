"""What a model raises for a caller's bad value.

The app maps :class:`InputError` to OpenAI's 400 ``invalid_request_error`` with ``param`` in one
place (``app/errors.py``); models never see HTTP.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request value the model cannot use; ``param`` names it as the API spells it (``"end"``,
    ``"constraints.similar_to"``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
