"""grain input pipelines over tfds array_record data sources.

`make_pipeline` returns a `grain.DataLoader`; `iter(loader)` gives a `DataLoaderIterator` whose
`get_state()` / `set_state()` capture the exact position, so a resumed iterator yields the same
batches as an uninterrupted one. Sharding across JAX processes follows grain's `IndexSampler`:
process p of P reads a disjoint contiguous block of record indices (the last
`len % P` records are dropped so every process has the same number of steps) and shuffles it with
`seed` afresh each epoch.

The batch sequence is a function of (seed, process_index, process_count, batch_size,
worker_count): with worker_count > 0 grain hands records to workers round-robin and each worker
batches its own, so batches differ from the in-process (worker_count=0) order. Restore a state
into a loader built with the same arguments.

Batches are dicts of numpy arrays:
  image   (B, H, W, C) float32 in [-1, 1] (uint8 / 127.5 - 1), resized first if image_size is set
  latent  (B, ...) float32 as stored (latent caches, see latents.py)
  x       (B, d) float32 (gmm)
  caption (B,) numpy str array
  label and other integer features: int32 (JAX's default integer width); nested feature
  dicts (e.g. celeb_a attributes) stay nested
"""

import grain
import numpy as np

from diffusion.data.builders import resize_uint8
from diffusion.data.sources import load_source


def preprocess_image(image: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """(H, W, C) uint8 -> float32 in [-1, 1]; with image_size S: centre-crop to a square, then
    PIL-bilinear resize to (S, S, C) (the usual CelebA / LSUN preprocessing)."""
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    if image_size is not None:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = resize_uint8(image[top : top + side, left : left + side], image_size)
    return image.astype(np.float32) / 127.5 - 1.0


def _convert(value):
    """Text -> str, integers -> int32, nested feature dicts recursively, the rest as numpy."""
    if isinstance(value, dict):
        return {k: _convert(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer):
        return value.astype(np.int32)
    return value


class Preprocess(grain.transforms.Map):
    """Decoded tfds example -> model-ready numpy example (see module docstring)."""

    def __init__(self, image_size: int | None = None, keys: tuple[str, ...] | None = None):
        self.image_size = image_size
        self.keys = keys

    def map(self, example):
        out = {}
        for key, value in example.items():
            if self.keys is not None and key not in self.keys:
                continue
            if key == "image":
                out[key] = preprocess_image(value, self.image_size)
            else:
                out[key] = _convert(value)
        return out


def make_pipeline(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    image_size: int | None = None,
    data_dir: str | None = None,
    keys: tuple[str, ...] | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    num_threads: int = 4,
) -> grain.DataLoader:
    """Batches of this process's shard of `name`/`split` (per-process batch size `batch_size`).

    name: a built-in ("digits", "shapes/64x64", "gmm/d2"; see DATASETS) or a tfds dataset
      prepared as array_record in data_dir / $TFDS_DATA_DIR ("cifar10", "mnist", ...).
    num_epochs: None repeats forever. worker_count=0 runs in-process (tests, small data);
      >0 uses grain worker processes. process_index / process_count default to JAX's.
    keys: keep only these features (default: all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if worker_count > 0:
        _ensure_absl_flags_parsed()
    source = load_source(name, split, data_dir)
    per_process = len(source) // process_count
    if drop_remainder and per_process < batch_size:
        raise ValueError(
            f"{name}/{split} has {len(source)} records, {per_process} per process "
            f"({process_count} processes): fewer than batch_size={batch_size}"
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardOptions(
            shard_index=process_index, shard_count=process_count, drop_remainder=True
        ),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    operations = [
        Preprocess(image_size, keys),
        grain.transforms.Batch(batch_size, drop_remainder=drop_remainder),
    ]
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64),
    )


def _ensure_absl_flags_parsed():
    """grain's worker processes read absl flags; outside absl.app.run they are never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def steps_per_epoch(
    name: str, split: str, *, batch_size: int, process_count: int = 1, data_dir: str | None = None
) -> int:
    """Number of full batches each process sees per epoch (with drop_remainder)."""
    return len(load_source(name, split, data_dir)) // process_count // batch_size


# --- orbax checkpointing of the iterator position -----------------------------------------
# Use with an orbax CheckpointManager, e.g.
#   mngr = ocp.CheckpointManager(dir, item_handlers={"data": data.checkpoint_handler(), ...})
#   mngr.save(step, args=ocp.args.Composite(data=data.checkpoint_save(it), ...))
#   mngr.restore(step, args=ocp.args.Composite(data=data.checkpoint_restore(it), ...))
# Each process writes its own file (process_<i>-of-<n>.json) holding its iterator state.


def checkpoint_handler():
    """The orbax CheckpointHandler for grain iterators (grain.checkpoint.CheckpointHandler)."""
    return grain.checkpoint.CheckpointHandler()


def checkpoint_save(iterator):
    """orbax save args for a grain iterator (captures its current position)."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore(iterator):
    """orbax restore args: restoring sets `iterator`'s state in place."""
    return grain.checkpoint.CheckpointRestore(iterator)
