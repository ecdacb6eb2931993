"""A judge for the shapes dataset: does an image show what its caption says? (GenEval-style.)

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment") scores a text-to-image model by reading each generated image with a detector and
checking every attribute the prompt states; a sample counts only if all of them match. Here the
reader is a small conv classifier trained on real shapes images (diffusion/data/shapes.py) with
the generator's labels. A caption parses to canonical attributes (`parse_caption`):

    count           1 or 2 shapes
    background      black / gray / brown
    shape1, color1  the only shape, or with two shapes the one in the top (or left) half
    position        one shape: the 3x3 grid cell of its centre ("top left", ..., "bottom right")
    relation        two shapes: "above" (one in the top half, the other in the bottom half) or
                    "to the left of" (left half / right half)
    shape2, color2  two shapes: the one in the bottom (or right) half

"A above B" and "B below A" describe the same image, so both parse to relation "above" with
shape1 = A: the judge scores what the image shows, not the caption's word order. A shape is in a
half when its bounding box is (rows or columns < S/2, or >= S/2); two shapes can be split both
ways (top left and bottom right), and then "A above B" and "A to the left of B" are both true.
So the network reads facts rather than a caption (`HEADS`, one softmax head each: count,
background, the single shape's kind / colour / grid cell, whether a top/bottom and a left/right
split holds, and the kind and colour in each half), and `score_readings` checks each stated
attribute against the facts it needs: "A above B" needs the top/bottom split, A on top and B
at the bottom.

    judge = shapes_judge.load("benchmarks/results/shapes_judge")
    s = judge.score(images, captions)     # images (N, 32, 32, 3) float in [-1, 1]
    s["adherence"], s["accuracy"]["color1"], s["records"][0]
    fd = shapes_judge.fd_in_judge_features(judge, images)   # to the real test split

Its penultimate features (`judge.features`) give a Frechet distance to real images, reported as
"FD in judge features": it is not FID (no Inception network) and not comparable with FID.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import data
from diffusion.data.shapes import COLORS, SHAPES  # noqa: F401  (the vocabulary the heads read)
from diffusion.metrics import frechet_distance
from diffusion.metrics.shapes_captions import (  # noqa: F401  (public names of the judge)
    ATTRIBUTES,
    CANONICAL_RELATIONS,
    FORMS,
    GRID,
    HEADS,
    VOCABULARY,
    head_labels,
    labels_to_attributes,
    parse_caption,
    score_readings,
)

# ----------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """widths: conv channels per stage (16x16 after a lossless 2x2 space-to-depth, then each
    further stage halves the resolution); features: size of the penultimate feature vector."""

    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 64)
    features: int = 256


class ShapesJudge(nnx.Module):
    """Plain conv net, NHWC, images (N, S, S, 3) in [-1, 1] -> {attribute: logits}.

    The input is space-to-depth'ed (2x2 pixels -> 12 channels: no information lost, 4x fewer
    positions to convolve) and given two coordinate channels (CoordConv, Liu et al. 2018) because
    the position head must place a centre to the pixel (a grid cell boundary lies between two
    pixel rows); the last feature map is flattened (not pooled) for the same reason."""

    def __init__(self, config: JudgeConfig, *, rngs: nnx.Rngs):
        self.config = config
        w = config.widths
        conv = lambda i, o, s=1: nnx.Conv(i, o, (3, 3), strides=s, rngs=rngs)
        self.stem = conv(12 + 2, w[0])
        layers = [conv(w[0], w[0])]
        for i in range(1, len(w)):
            layers += [conv(w[i - 1], w[i], 2), conv(w[i], w[i])]
        self.convs = nnx.List(layers)
        side = config.image_size // 2 // 2 ** (len(w) - 1)
        self.fc = nnx.Linear(side * side * w[-1], config.features, rngs=rngs)
        self.heads = nnx.Dict(
            {k: nnx.Linear(config.features, len(v), rngs=rngs) for k, v in HEADS.items()}
        )

    def features(self, x):
        b, s = x.shape[0], self.config.image_size
        x = x.reshape(b, s // 2, 2, s // 2, 2, 3)  # (B, S/2, 2, S/2, 2, 3)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, s // 2, s // 2, 12)  # (B, S/2, S/2, 12)
        coord = jnp.linspace(-1.0, 1.0, s // 2, dtype=x.dtype)
        yy, xx = jnp.broadcast_arrays(coord[:, None], coord[None, :])  # (S/2, S/2) each
        coords = jnp.broadcast_to(jnp.stack([xx, yy], -1), (b, s // 2, s // 2, 2))
        h = nnx.relu(self.stem(jnp.concatenate([x, coords], -1)))
        for layer in self.convs:
            h = nnx.relu(layer(h))
        return nnx.relu(self.fc(h.reshape(b, -1)))  # (B, features)

    def __call__(self, x):
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}, f


def check_images(images, size: int = 32) -> np.ndarray:
    """(N, size, size, 3) float in [-1, 1] (uint8 is converted); anything else raises."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise ValueError(f"images must be (N, {size}, {size}, 3) NHWC, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be float in [-1, 1] or uint8, got dtype {x.dtype}")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < -1.5 or hi > 1.5:
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return np.clip(x, -1.0, 1.0).astype(np.float32)


class Judge:
    """A trained ShapesJudge behind jitted, batched numpy calls (fixed batch: one compile).

    Images are (N, 32, 32, 3) float in [-1, 1] as training uses them (or uint8); pipelines'
    [0, 1] output must be mapped with 2 * x - 1 first."""

    def __init__(self, model: ShapesJudge, batch_size: int = 500):
        self.config = model.config
        self.batch_size = batch_size
        self.reference_features = {}  # (name, data_dir) -> features of the real test split
        graphdef, self.params = nnx.split(model)
        self._apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

    def _run(self, images):
        x = check_images(images, self.config.image_size)
        n = len(x)
        b = min(self.batch_size, 1 << max(n - 1, 0).bit_length())  # few shapes: few compiles
        outs = []
        for i in range(0, n, b):
            m = min(b, n - i)
            pad = np.zeros((b - m, *x.shape[1:]), x.dtype)
            out = self._apply(self.params, np.concatenate([x[i : i + m], pad]))
            outs.append(jax.tree.map(lambda a: np.asarray(a[:m]), out))  # noqa: B023
        if not outs:
            empty = {k: np.zeros((0, len(v)), np.float32) for k, v in HEADS.items()}
            return empty, np.zeros((0, self.config.features), np.float32)
        return jax.tree.map(lambda *a: np.concatenate(a), *outs)

    def read(self, images) -> dict:
        """{head: (N,) class index into HEADS[head]} for every head."""
        return {k: v.argmax(-1) for k, v in self._run(images)[0].items()}

    def features(self, images) -> np.ndarray:
        """Penultimate features, (N, config.features) float32."""
        return self._run(images)[1]

    def score(self, images, captions) -> dict:
        """`score_readings` of this judge's readings of the images (see there)."""
        captions = list(captions)
        if len(captions) != len(images):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        return score_readings(self.read(images), captions)


# ----------------------------------------------------------------------------- files


def save(model: ShapesJudge, path: str, **info) -> None:
    """Write judge.safetensors (parameters) and judge_config.json (JudgeConfig + vocabularies +
    `info`, e.g. the held-out accuracies) to the folder `path`."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}
    save_file(tensors, os.path.join(path, "judge.safetensors"))
    config = {"config": dataclasses.asdict(model.config), "heads": HEADS, **info}
    with open(os.path.join(path, "judge_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load(path: str, batch_size: int = 500) -> Judge:
    """The Judge saved in folder `path` by `save` (e.g. "benchmarks/results/shapes_judge")."""
    from safetensors.numpy import load_file

    files = [os.path.join(path, n) for n in ("judge_config.json", "judge.safetensors")]
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: is {path!r} a folder written by save()?")
    with open(files[0]) as f:
        saved = json.load(f)
    if saved.get("heads") != json.loads(json.dumps(HEADS)):
        raise ValueError(f"{path} was trained with other heads than {HEADS}")
    cfg = saved["config"]
    cfg = JudgeConfig(**cfg | {"widths": tuple(cfg["widths"])})
    model = nnx.eval_shape(lambda: ShapesJudge(cfg, rngs=nnx.Rngs(0)))  # no init compute
    tensors = load_file(files[1])
    flat = []
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, want = ".".join(map(str, key)), var.get_value().shape
        if name not in tensors or tensors[name].shape != want:
            got = tensors[name].shape if name in tensors else "missing"
            raise ValueError(f"{files[1]}: {name} expected shape {want}, got {got}")
        flat.append((key, var.replace(jnp.asarray(tensors[name]))))
    nnx.update(model, nnx.from_flat_state(flat))
    return Judge(model, batch_size)


# ----------------------------------------------------------------------------- degradations and FD


@functools.partial(jax.jit, static_argnames="radius")
def gaussian_blur(x, sigma, radius: int = 3):
    """Per-image Gaussian blur of (B, H, W, C) images with std `sigma` (scalar or (B,)) pixels,
    separable, edge-padded; sigma 0 is the identity."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
    d = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    k = jnp.exp(-0.5 * (d[None] / jnp.maximum(sigma[:, None], 1e-3)) ** 2)  # (B, 2R+1)
    k = k / k.sum(-1, keepdims=True)
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    p = sum(k[:, i, None, None, None] * p[:, i : i + h] for i in range(2 * radius + 1))
    return sum(k[:, i, None, None, None] * p[:, :, i : i + w] for i in range(2 * radius + 1))


def degrade(images, rng, blur_sigma: float = 0.0, noise_sigma: float = 0.0):
    """Images in [-1, 1] blurred (std in pixels) plus Gaussian pixel noise (std in [-1, 1]
    units), clipped to [-1, 1]: a stand-in for what generated images look like."""
    x = jnp.asarray(check_images(images))
    x = gaussian_blur(x, blur_sigma) if blur_sigma > 0 else x
    x = x + noise_sigma * jax.random.normal(rng, x.shape, x.dtype)
    return np.asarray(jnp.clip(x, -1.0, 1.0))


def real_examples(name: str = "shapes/32x32", split: str = "test", data_dir=None, limit=None):
    """The decoded examples (dicts of numpy: uint8 image, caption bytes, generator labels) of a
    prepared shapes split, in index order."""
    source = data.load_source(name, split, data_dir)
    n = len(source) if limit is None else min(limit, len(source))
    return source.__getitems__(list(range(n)))


def real_images(name: str = "shapes/32x32", split: str = "test", data_dir=None, limit=None):
    """(images (N, S, S, 3) float32 in [-1, 1], captions, examples) of a prepared shapes split."""
    examples = real_examples(name, split, data_dir, limit)
    images = np.stack([data.preprocess_image(np.asarray(e["image"])) for e in examples])
    captions = [e["caption"].decode() for e in examples]
    return images, captions, examples


def fd_in_judge_features(
    judge: Judge, images, reference=None, data_dir=None, name: str = "shapes/32x32"
) -> float:
    """Frechet distance between judge features of `images` and of `reference` (images, or
    features (M, F)); default reference: the real test split of `name` (5000 images for
    shapes/32x32). Report it as "FD in judge features", never as FID. FD is biased upwards for
    few samples: compare only values computed with the same numbers of images."""
    if reference is None:
        if (name, data_dir) not in judge.reference_features:  # computed once per judge
            real = real_images(name, "test", data_dir)[0]
            judge.reference_features[name, data_dir] = judge.features(real)
        reference = judge.reference_features[name, data_dir]
    ref = np.asarray(reference)
    ref = ref if ref.ndim == 2 else judge.features(ref)
    return frechet_distance(judge.features(images), ref)
