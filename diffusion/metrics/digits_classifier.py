"""A digits classifier trained here: the feature space for "FD in digits-classifier features".

    features_fn, logits_fn = metrics.digits_classifier.load("benchmarks/results/digits_classifier")
    fd = metrics.frechet_distance(features_fn(real), features_fn(samples))

Images are (N, 8, 8, 1) in [-1, 1], the range of the data pipeline and of the digits diffusion
models' samples (`data.preprocess_image`); features are the classifier's 128-d penultimate layer.
This is not Inception: report Frechet distances in it as "FD in digits-classifier features",
never as FID. Trained by `python -m experiments.train_digits_classifier --workdir W` on the
built-in digits train split (first 1497 of scikit-learn's digits), with random 1-pixel shifts;
its accuracy on the real test split (the last 300) is in the JSON next to the weights.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.metrics import classifier

STEM = "digits_classifier"
INPUT_RANGE = (-1.0, 1.0)


def config(image_size: int = 8) -> classifier.ClassifierConfig:
    return classifier.ClassifierConfig(
        image_size=image_size, in_channels=1, channels=(32, 64), feature_dim=128,
        heads=(("label", 10),),
    )  # fmt: skip


def real_digits(name: str, split: str, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32) of a built-in digits split."""
    from diffusion import data  # tensorflow-datasets: imported only when digits are read

    source = data.load_source(name, split, data_dir)
    examples = [source[i] for i in range(len(source))]
    x = np.stack([data.preprocess_image(np.asarray(e["image"])) for e in examples])
    return x, np.asarray([int(e["label"]) for e in examples], np.int32)


def shift_augment(rng, images, max_shift: int = 1):
    """Random translation by up to max_shift pixels per image, background (-1) filled in."""
    n, s = images.shape[0], images.shape[1]
    m = max_shift
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=INPUT_RANGE[0])
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * m + 1)  # (N, 2) crop corners

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (s, s, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _batches(x, y, batch_size: int, seed: int):
    """Endless shuffled epochs of {"image", "label"} numpy batches."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(x))
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield {"image": x[idx], "label": y[idx]}


def train(
    directory: str,
    *,
    dataset: str = "digits",
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    data_dir=None,
    log=None,
) -> dict:
    """Train on `dataset`'s train split, write digits_classifier.{safetensors,json} to
    directory, return {"test_accuracy", "train_accuracy", ...} (real splits, no augmentation)."""
    x_train, y_train = real_digits(dataset, "train", data_dir)
    x_test, y_test = real_digits(dataset, "test", data_dir)
    model = classifier.ConvClassifier(config(x_train.shape[1]), rngs=nnx.Rngs(seed))
    classifier.fit(
        model, _batches(x_train, y_train, batch_size, seed), steps=steps, lr=lr, seed=seed,
        augment=shift_augment, log=log,
    )  # fmt: skip
    result = {
        "dataset": dataset,
        "input_range": list(INPUT_RANGE),
        "test_accuracy": classifier.accuracy(model, x_test, {"label": y_test})["label"],
        "train_accuracy": classifier.accuracy(model, x_train, {"label": y_train})["label"],
        "num_test": len(x_test),
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed},
    }
    classifier.save(model, directory, STEM, result)
    return result


def load(path: str):
    """(features_fn, logits_fn) of a trained digits classifier in `path` (a directory with
    digits_classifier.safetensors + .json): images (N, S, S, 1) in [-1, 1] ->
    (N, 128) features / (N, 10) logits, jitted."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory with {STEM}.safetensors / .json")
    model, _ = classifier.load_model(path, STEM)
    features_fn, logits_fn = classifier.feature_fns(model)
    return features_fn, lambda images: logits_fn(images)["label"]
