"""Our own image generators, trained here on scikit-learn's handwritten digits: ``genserve-gan``,
``genserve-vae`` and ``genserve-flow`` (families ``gan``, ``image-vae``, ``flow``).

Each module (``gan.py``, ``vae.py``, ``flow.py``) holds one network, a ``load(path, device, dtype)``
that returns an :class:`~genserve.models.image.generator.ImageGenerator` (``generator.py``: the one
interface the serving layer uses), ``make_tiny(path)`` and ``train(out, minutes, seed, threads)``
(``genserve train``). ``train.py`` and ``evaluate.py`` are their shared training and evaluation;
``classifier.py`` and ``digits.py`` the measuring instrument and the data.
"""

from genserve.models.image.generator import (
    CLASS_NAMES,
    MAX_ROWS,
    SIZE,
    ImageGenerator,
    ImageNet,
    check_class,
    class_from_latent,
    to_uint8,
)

__all__ = ["CLASS_NAMES", "MAX_ROWS", "SIZE", "ImageGenerator", "ImageNet", "check_class", "class_from_latent",
           "to_uint8"]
