"""The store behind ``response_format: url`` keeps to its byte cap counting what each entry really
costs (with tiny images it held about 1.9x its cap) and to an item cap."""

from __future__ import annotations

import os
import tracemalloc

from genserve.app.serving import images as images_module
from genserve.app.serving.images import ImageStore


def test_tiny_images_keep_the_store_within_its_byte_cap() -> None:
    cap = 1 << 20
    store = ImageStore(ttl_s=3600, max_bytes=cap)
    images = [os.urandom(100) for _ in range(12_000)]  # 1.2 MB of data: the oldest must go
    # The images exist already: what is traced is the store's own cost, the memory still held that was
    # allocated under the store's code (not another thread's, such as the session's server polling).
    tracemalloc.start(16)
    try:
        first = store.put(images[0], "image/png")
        for image in images[1:]:
            last = store.put(image, "image/png")
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    own = snapshot.filter_traces([tracemalloc.Filter(True, images_module.__file__, all_frames=True)])
    held = sum(trace.size for trace in own.traces)
    kept = len(store._items)
    data = sum(len(entry[0]) for entry in store._items.values())
    assert held + data <= cap, f"{held + data} bytes held for a cap of {cap}"
    assert store.get(last) is not None and store.get(first) is None and kept > 2000


def test_the_item_cap_drops_the_oldest() -> None:
    store = ImageStore(ttl_s=3600, max_bytes=1 << 30, max_items=3)
    keys = [store.put(b"x", "image/png") for _ in range(5)]
    assert [store.get(k) is not None for k in keys] == [False, False, True, True, True]
