"""A small convolutional classifier as an in-house feature extractor, with training and files.

Used for the digits classifier (digits_classifier.py) and meant to be shared by other in-house
judges (e.g. a shapes judge with several heads: shape, colour, position):

  ClassifierConfig      typed architecture: input size/channels, conv widths, feature width,
                        named heads (name, number of classes)
  ConvClassifier        stages of [conv3x3 -> GroupNorm -> SiLU] x 2, 2x2 average pooling
                        between stages, global average pool, dense -> SiLU = the features
                        (penultimate layer, what Frechet distances use), one linear head each
  fit                   AdamW + softmax cross-entropy summed over heads; pure jitted step
  accuracy              per-head accuracy on arrays
  save / load_model     `<stem>.safetensors` (flat "a.b.kernel" names) + `<stem>.json`
                        (the config and any metadata, e.g. input range and test accuracy)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 8
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64)
    feature_dim: int = 128
    heads: tuple[tuple[str, int], ...] = (("label", 10),)
    groups: int = 8

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown classifier config keys {unknown}; valid: {sorted(known)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        if "heads" in d:
            d["heads"] = tuple((str(n), int(k)) for n, k in d["heads"])
        return cls(**d)


class _Stage(nnx.Module):
    def __init__(self, c_in, c_out, groups, *, rngs):
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), rngs=rngs)
        self.norm1 = nnx.GroupNorm(c_out, num_groups=groups, rngs=rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), rngs=rngs)
        self.norm2 = nnx.GroupNorm(c_out, num_groups=groups, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.silu(self.norm1(self.conv1(x)))
        return jax.nn.silu(self.norm2(self.conv2(x)))


class ConvClassifier(nnx.Module):
    """Images (N, S, S, C) -> features (N, feature_dim) -> {head: logits (N, classes)}."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = (config.in_channels, *config.channels)
        self.stages = nnx.List(
            [_Stage(a, b, config.groups, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.dense = nnx.Linear(widths[-1], config.feature_dim, rngs=rngs)
        self.heads = nnx.Dict(
            {n: nnx.Linear(config.feature_dim, k, rngs=rngs) for n, k in config.heads}
        )

    def features(self, x):
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else nnx.avg_pool(x, (2, 2), (2, 2)))  # halve the grid
        return jax.nn.silu(self.dense(jnp.mean(x, axis=(1, 2))))  # (N, feature_dim)

    def __call__(self, x):
        f = self.features(x)
        return {n: head(f) for n, head in self.heads.items()}


def _check_images(images, config: ClassifierConfig):
    images = jnp.asarray(images)
    s, c = config.image_size, config.in_channels
    if images.ndim != 4 or images.shape[1:] != (s, s, c) or images.shape[0] == 0:
        raise ValueError(f"images must be (N >= 1, {s}, {s}, {c}), got {images.shape}")
    return images.astype(jnp.float32)


def fit(
    model: ConvClassifier,
    batches: Iterator[dict],
    *,
    steps: int,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    augment: Callable | None = None,
    log: Callable[[int, float], None] | None = None,
) -> ConvClassifier:
    """Train in place on batches {"image": (B, S, S, C), <head>: (B,) int labels, ...}.

    AdamW with cosine decay; loss = sum over heads of the mean softmax cross-entropy.
    augment(rng, images) -> images is applied inside the step. log(step, loss) every 100 steps.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.05), weight_decay=weight_decay)
    heads = [n for n, _ in model.config.heads]

    def loss_fn(params, batch, rng):
        x = batch["image"] if augment is None else augment(rng, batch["image"])
        logits = nnx.merge(graphdef, params)(x)
        return sum(
            optax.softmax_cross_entropy_with_integer_labels(logits[h], batch[h]).mean()
            for h in heads
        )

    @jax.jit
    def step(params, opt, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    opt, key = tx.init(params), jax.random.key(seed)
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items() if k in ("image", *heads)}
        params, opt, loss = step(params, opt, batch, jax.random.fold_in(key, i))
        if log is not None and (i + 1) % 100 == 0:
            log(i + 1, float(loss))
    nnx.update(model, params)
    return model


def accuracy(model: ConvClassifier, images, labels: dict, batch_size: int = 500) -> dict:
    """{head: fraction of argmax == label} over arrays (batched)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    preds = {h: [] for h in labels}
    for i in range(0, len(images), batch_size):
        out = fn(state, _check_images(images[i : i + batch_size], model.config))
        for h in labels:
            preds[h].append(np.asarray(jnp.argmax(out[h], -1)))
    return {h: float(np.mean(np.concatenate(preds[h]) == np.asarray(labels[h]))) for h in labels}


def _flat_params(model: ConvClassifier) -> dict[str, tuple[tuple, object]]:
    """ "stages.0.conv1.kernel" -> (the state path, value) for every parameter."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {".".join(map(str, path)): (path, v) for path, v in flat.items()}


def save(model: ConvClassifier, directory: str, stem: str, metadata: dict | None = None) -> None:
    """Write `<stem>.safetensors` (parameters) and `<stem>.json` (config + metadata)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.asarray(v) for k, (_, v) in _flat_params(model).items()}
    save_file(tensors, os.path.join(directory, f"{stem}.safetensors"))
    record = {"config": dataclasses.asdict(model.config), **(metadata or {})}
    with open(os.path.join(directory, f"{stem}.json"), "w") as f:
        json.dump(record, f, indent=2)


def load_model(directory: str, stem: str) -> tuple[ConvClassifier, dict]:
    """(model, the JSON record) from `save`'s files; every tensor checked by name and shape."""
    from safetensors.numpy import load_file

    base = os.path.join(directory, stem)
    if not (os.path.exists(base + ".json") and os.path.exists(base + ".safetensors")):
        raise FileNotFoundError(f"no {stem}.json + {stem}.safetensors in {directory}")
    with open(base + ".json") as f:
        record = json.load(f)
    config = ClassifierConfig.from_dict(record["config"])
    model = nnx.eval_shape(lambda: ConvClassifier(config, rngs=nnx.Rngs(0)))
    flat = _flat_params(model)
    want = {k: v for k, (_, v) in flat.items()}
    got = load_file(base + ".safetensors")
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    both = sorted(set(want) & set(got))
    problems += [
        f"{k}: file shape {got[k].shape} vs config shape {want[k].shape}"
        for k in both
        if got[k].shape != want[k].shape
    ]
    if problems:
        raise ValueError(f"{base}.safetensors does not match {stem}.json: " + "; ".join(problems))
    pure = traverse_util.unflatten_dict({flat[k][0]: jnp.asarray(got[k]) for k in want})
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model, record


def feature_fns(model: ConvClassifier) -> tuple[Callable, Callable]:
    """(features_fn, logits_fn), jitted, weights passed as arguments (not baked in)."""
    graphdef, state = nnx.split(model)
    feats = jax.jit(lambda state, x: nnx.merge(graphdef, state).features(x))
    logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    config = model.config
    return (
        lambda images: feats(state, _check_images(images, config)),
        lambda images: logits(state, _check_images(images, config)),
    )
