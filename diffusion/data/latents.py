"""Cache VAE latents once, as an array_record tfds dataset read by the same pipeline.

Latent diffusion trains on `z = encode(x)`; encoding every step wastes most of the step on the
frozen VAE. `cache_latents` runs `encode_fn` once over every split and writes a dataset with a
float32 `latent` feature in place of `image`, keeping the other features (label, caption, ...)
and `source_index` (the record's index in the source split). Read it back with
`make_pipeline(name, split, data_dir=out_dir, ...)`.
"""

import os
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from diffusion.data.pipeline import preprocess_image
from diffusion.data.sources import DATASETS, load_builder


class LatentCache(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes pre-encoded examples; instances carry the features and example generators."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see NO_CODE_PATH in builders.py

    def __init__(self, *, cache_name: str, features: dict, split_examples: dict, **kwargs):
        self.name = cache_name  # tfds lays files out under data_dir/<name>/<version>
        self._cache_features = features
        self._cache_splits = split_examples
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Cached latents written by diffusion.data.cache_latents.",
            features=tfds.features.FeaturesDict(self._cache_features),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(fn) for split, fn in self._cache_splits.items()}

    def _generate_examples(self, make_examples):
        yield from make_examples()


def _encoded_examples(source, encode_fn, batch_size, image_key, image_size):
    """Yield (key, example) with example[image_key] replaced by its latent, in batches."""

    def generate():
        for start in range(0, len(source), batch_size):
            idx = list(range(start, min(start + batch_size, len(source))))
            records = source.__getitems__(idx)
            images = np.stack([preprocess_image(r[image_key], image_size) for r in records])
            latents = np.asarray(encode_fn(images), dtype=np.float32)  # (B, ...)
            if latents.shape[0] != len(idx):
                raise ValueError(f"encode_fn returned {latents.shape} for {images.shape} images")
            for i, record, z in zip(idx, records, latents):
                ex = {k: v for k, v in record.items() if k != image_key}
                yield i, {**ex, "latent": z, "source_index": i}

    return generate


def cache_latents(
    source: str | Mapping,
    encode_fn: Callable[[np.ndarray], np.ndarray],
    out_dir: str,
    *,
    name: str = "latents",
    data_dir: str | None = None,
    splits: tuple[str, ...] | None = None,
    batch_size: int = 64,
    image_key: str = "image",
    image_size: int | None = None,
) -> str:
    """Encode every image of `source` with `encode_fn` and write dataset `name` into out_dir.

    source: a dataset name (as for make_pipeline; read from data_dir) or a mapping
      split -> tfds data source (e.g. `{"train": load_source("digits", "train")}`).
    encode_fn: (B, H, W, C) float32 images in [-1, 1] -> (B, ...) latents (e.g. a jitted VAE
      encoder returning the scaled latent mean).
    Returns the prepared dataset directory. Does nothing if `name` is already prepared there.
    """
    if name.partition("/")[0] in DATASETS:
        raise ValueError(f"cache name {name!r} collides with a built-in dataset {sorted(DATASETS)}")
    if isinstance(source, str):
        builder = load_builder(source, data_dir)
        splits = tuple(splits or builder.info.splits)
        sources = {s: builder.as_data_source(split=s) for s in splits}
    else:
        sources = {s: source[s] for s in (splits or source)}
    first = next(iter(sources.values()))
    src_features = first.dataset_info.features
    if image_key not in src_features:
        raise ValueError(f"source has no {image_key!r} feature; features: {list(src_features)}")

    # Encode one record to learn the latent shape the features must declare.
    probe = preprocess_image(first[0][image_key], image_size)[None]  # (1, H, W, C)
    latent_shape = np.asarray(encode_fn(probe)).shape[1:]
    features = {k: src_features[k] for k in src_features.keys() if k != image_key}
    features["latent"] = tfds.features.Tensor(shape=latent_shape, dtype=np.float32)
    features["source_index"] = tfds.features.Scalar(dtype=np.int64)
    split_examples = {
        s: _encoded_examples(src, encode_fn, batch_size, image_key, image_size)
        for s, src in sources.items()
    }
    builder = LatentCache(
        cache_name=name,
        features=features,
        split_examples=split_examples,
        data_dir=os.fspath(out_dir),
        file_format="array_record",
    )
    builder.download_and_prepare(file_format="array_record")
    return os.fspath(builder.data_dir)
