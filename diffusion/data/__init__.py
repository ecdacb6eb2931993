"""Datasets and grain input pipelines (tfds array_record sources, no TensorFlow needed).

Built-in datasets (`DATASETS`; prepared offline on first use, seconds to a minute; the first
config listed is the default, e.g. "digits" = "digits/8x8"):
  digits[/8x8|16x16|32x32]   scikit-learn's handwritten digits, grey (S, S, 1), label 0-9
  shapes[/32x32|64x64|tiny]  coloured shapes with captions ("a red circle above a blue square
                             on a black background"), labels for shape / colour / position
  gmm[/gmm2d|gmm2d_separated|gaussian2d|gmm_image|d2|d8|d64|tiny]
                             vectors `x` from a Gaussian mixture; `load_gmm(name)` gives the
                             exact `analytic.GMM` (stored in the dataset's metadata)
Any other name is a tfds dataset that must already be prepared as array_record in `data_dir`
(default $TFDS_DATA_DIR, else ~/tensorflow_datasets); nothing is downloaded at run time:
  tfds build cifar10 --data_dir=$TFDS_DATA_DIR --file_format=array_record

Prepare ahead of time (do this before a multi-host run, so processes do not race to write):
  python -m diffusion.data shapes/64x64 digits/32x32 --data_dir /path/to/tfds

Use:
  loader = data.make_pipeline("shapes/32x32", "train", batch_size=64, seed=0)
  it = iter(loader)        # checkpointable: it.get_state() / it.set_state(state)
  batch = next(it)         # {"image": (64, 32, 32, 3) float32 in [-1, 1], "caption": ..., ...}
In a multi-host run each process reads its own shard (process_index / process_count default to
JAX's); `checkpoint_handler` / `checkpoint_save` / `checkpoint_restore` put the iterator
position into an orbax checkpoint. `cache_latents` encodes a dataset once with a VAE and writes
a latent dataset that the same pipeline reads.
"""

from diffusion.data.gmm import random_gmm, sample_gmm
from diffusion.data.latents import cache_latents
from diffusion.data.pipeline import (
    Preprocess,
    checkpoint_handler,
    checkpoint_restore,
    checkpoint_save,
    make_pipeline,
    preprocess_image,
    steps_per_epoch,
)
from diffusion.data.sources import (
    DATASETS,
    default_data_dir,
    load_builder,
    load_gmm,
    load_source,
    prepare,
)

__all__ = [
    "DATASETS",
    "Preprocess",
    "cache_latents",
    "checkpoint_handler",
    "checkpoint_restore",
    "checkpoint_save",
    "default_data_dir",
    "load_builder",
    "load_gmm",
    "load_source",
    "make_pipeline",
    "prepare",
    "preprocess_image",
    "random_gmm",
    "sample_gmm",
    "steps_per_epoch",
]
