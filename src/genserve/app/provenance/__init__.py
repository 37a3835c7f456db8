"""Provenance: what marks genserve's outputs as AI-made, and the check that finds those marks later.

- ``keys``: the operator's secret (a setting), or one genserve makes in its state directory.
- ``service``: which output gets which mark (``ProvenanceService.text``), the ``provenance`` object
  responses carry, and ``/v1/provenance/verify``.

The text watermark itself lives with the engine's sampler (``models/text/watermark.py``): it is
applied per row there, so batching never changes a seeded output.
"""
