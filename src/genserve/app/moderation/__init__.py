"""Moderation: what goes in and what comes out, for every backend alike.

``categories`` (OpenAI's 13), ``policy`` (what the operator decided: global ∧ model ∧ key, the
strictest wins), the classifiers (``text``: normalisation, blocked terms, word lists, hatesonar, phrase
rules; ``guard``: Llama Guard style models on a text backend; ``images``: a CLIP safety checker;
``molecules``: the dual-use gate), ``gate`` (the stream hold-back gate) and ``service`` (what serving
calls).
"""
