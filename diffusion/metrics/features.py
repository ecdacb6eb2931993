"""Run a feature extractor over a large image set in fixed-size batches."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def extract(features_fn: Callable, images, batch_size: int = 100) -> np.ndarray:
    """features_fn over images (N, ...) in batches of batch_size -> (N, F) numpy.

    The last batch is padded by repeating its final image, so every call has the same shape and
    the extractor compiles once; the padded rows are dropped.
    """
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError(f"no images to extract features from (shape {images.shape})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        pad = batch_size - len(batch) if n > batch_size else 0
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
        out.append(np.asarray(features_fn(batch))[: len(batch) - pad])
    return np.concatenate(out)
