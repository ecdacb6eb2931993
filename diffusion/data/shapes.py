"""Procedural coloured shapes with captions: a tiny text-to-image dataset, no download needed.

Each image holds one or two flat-coloured shapes (no anti-aliasing, so every pixel is either the
background colour or a shape colour) and a caption such as
"a red circle above a blue square on a black background" or
"a green triangle at the top left on a gray background". Two shapes sit in opposite halves of the
image, so the caption's relation is true and they never overlap. Example i of a split is drawn
from `np.random.default_rng([seed, split_id, i])`: the data is a pure function of the config.

Geometry (integers, pixels): `centers[j] = (x, y)` and `radii[j] = r` is the half-size of the
shape's bounding box: circle of radius r, axis-aligned square of half-side r, upward triangle
with apex (x, y - r) and base y + r, diamond with vertices at distance r.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from diffusion.data.builders import png_bytes

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (64, 64, 64), "brown": (96, 64, 32)}
RELATIONS = ("none", "above", "below", "to the left of", "to the right of")
_GRID = (("top left", "top", "top right"), ("left", "center", "right"))
_GRID += (("bottom left", "bottom", "bottom right"),)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    size: int = 32
    num_train: int = 50000
    num_test: int = 5000
    max_shapes: int = 2
    seed: int = 0


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, fill) -> None:
    """Draw one filled shape whose bounding box is [cx - r, cx + r] x [cy - r, cy + r]."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def _place(rng, size: int, radii, relation: str):
    """Integer centres (x, y) keeping each shape inside the image (and its half, if two)."""
    half = size // 2
    full = [(r + 1, size - 2 - r) for r in radii]  # inclusive [lo, hi] per shape
    first = [(r + 1, half - 1 - r) for r in radii[:1]]  # shape 1 in the first half
    second = [(half + 1 + r, size - 2 - r) for r in radii[1:]]  # shape 2 in the second half
    if relation == "none":
        xs, ys = full, full
    elif relation in ("above", "to the left of"):
        ys_or_xs = first + second
        xs, ys = (full, ys_or_xs) if relation == "above" else (ys_or_xs, full)
    else:  # below / to the right of: shape 1 in the second half
        swapped = [(half + 1 + radii[0], size - 2 - radii[0]), (radii[1] + 1, half - 1 - radii[1])]
        xs, ys = (full, swapped) if relation == "below" else (swapped, full)
    cx = [int(rng.integers(lo, hi + 1)) for lo, hi in xs]
    cy = [int(rng.integers(lo, hi + 1)) for lo, hi in ys]
    return list(zip(cx, cy))


def make_example(rng: np.random.Generator, size: int, max_shapes: int = 2) -> dict:
    """Draw one example (image as (size, size, 3) uint8 plus labels and caption)."""
    n = int(rng.integers(1, max_shapes + 1))
    shape_ids = rng.integers(0, len(SHAPES), size=n)
    color_ids = rng.integers(0, len(COLORS), size=n)
    bg_id = int(rng.integers(0, len(BACKGROUNDS)))
    radii = [int(v) for v in rng.integers(round(0.12 * size), round(0.2 * size) + 1, size=n)]
    relation = "none" if n == 1 else RELATIONS[int(rng.integers(1, len(RELATIONS)))]
    centers = _place(rng, size, radii, relation)

    colors, bgs = list(COLORS), list(BACKGROUNDS)
    img = Image.new("RGB", (size, size), BACKGROUNDS[bgs[bg_id]])
    draw = ImageDraw.Draw(img)
    phrases = []
    for j in range(n):
        shape, color = SHAPES[shape_ids[j]], colors[color_ids[j]]
        draw_shape(draw, shape, *centers[j], radii[j], COLORS[color])
        phrases.append(f"a {color} {shape}")
    if n == 1:
        x, y = centers[0]
        where = _GRID[min(3 * y // size, 2)][min(3 * x // size, 2)]
        caption = f"{phrases[0]} at the {where}"
    else:
        caption = f"{phrases[0]} {relation} {phrases[1]}"
    caption += f" on a {bgs[bg_id]} background"

    pad = 2 - n
    return {
        "image": np.asarray(img, dtype=np.uint8),
        "caption": caption,
        "label": int(shape_ids[0]),
        "num_shapes": n,
        "shapes": np.array(list(shape_ids) + [-1] * pad, np.int64),
        "colors": np.array(list(color_ids) + [-1] * pad, np.int64),
        "centers": np.array(centers + [(-1, -1)] * pad, np.int64),
        "radii": np.array(radii + [-1] * pad, np.int64),
        "relation": RELATIONS.index(relation),
        "background": bg_id,
    }


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Coloured shapes with captions (see module docstring); `label` is the first shape's kind."""

    name = "shapes"
    code_path = None  # see NO_CODE_PATH in builders.py
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        ShapesConfig(name="32x32", size=32),
        ShapesConfig(name="64x64", size=64),
        ShapesConfig(name="tiny", size=32, num_train=256, num_test=64),
    ]

    def _info(self):
        s = self.builder_config.size
        int2 = lambda shape: tfds.features.Tensor(shape=shape, dtype=np.int64)
        features = {
            "image": tfds.features.Image(shape=(s, s, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=SHAPES),
            "num_shapes": tfds.features.Scalar(dtype=np.int64),
            "shapes": int2((2,)),  # index into SHAPES, -1 if absent
            "colors": int2((2,)),  # index into COLORS, -1 if absent
            "centers": int2((2, 2)),  # (x, y) pixels, -1 if absent
            "radii": int2((2,)),
            "relation": tfds.features.ClassLabel(names=RELATIONS),
            "background": tfds.features.ClassLabel(names=list(BACKGROUNDS)),
            "index": tfds.features.Scalar(dtype=np.int64),  # i in default_rng([seed, split, i])
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(colors=COLORS, backgrounds=BACKGROUNDS),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples(0, c.num_train),
            "test": self._generate_examples(1, c.num_test),
        }

    def _generate_examples(self, split_id, n):
        c = self.builder_config
        for i in range(n):
            ex = make_example(np.random.default_rng([c.seed, split_id, i]), c.size, c.max_shapes)
            ex["image"] = png_bytes(ex["image"])
            yield i, {**ex, "index": i}
