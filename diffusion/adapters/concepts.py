"""What the shapes fine-tuning experiments teach, and the direct measures that read it back.

The shapes generator (diffusion/data/shapes.py) draws flat-coloured shapes without
anti-aliasing, so every pixel is the background or a shape colour, and it knows each image's
layout exactly. On top of it:

  new colour   "purple" (RGB 128, 0, 192; at least 142 away from every training colour): a
               single-shape example whose shape is repainted purple, caption word replaced
               ("a purple circle at the top on a gray background"). The base model never saw
               the word or the colour (shapes_lora).
  subject      "sks square": a square whose left half is yellow and right half blue, a specific
               object DreamBooth learns from a few images under a rare token; its class prompt
               drops the token ("a square at the top on a black background") (shapes_dreambooth).
  layout mask  the shapes' exact silhouette (1 inside any shape), the control image of
               shapes_controlnet (3 equal channels in [0, 1]).

Measures on generated images (float in [-1, 1] or uint8, (N, H, W, 3)): the background is the
median border colour; foreground pixels are farther than 80 (0-255 units) from it; each
foreground pixel takes the nearest palette colour (the 8 training colours + purple).
`color_fraction` -> share of foreground pixels of one colour; `is_subject` -> >= 25% yellow and
>= 25% blue foreground with the yellow centroid left of the blue one; `mask_iou` -> IoU of the
foreground with a layout mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from diffusion.data import shapes

NEW_COLOR = ("purple", (128, 0, 192))
SUBJECT_TOKEN = "sks"
SUBJECT_COLORS = ("yellow", "blue")  # left half, right half
PALETTE = {**shapes.COLORS, NEW_COLOR[0]: NEW_COLOR[1]}
FOREGROUND_DISTANCE = 80.0


def _single(rng, size, kind=None):
    """A one-shape generator example (of `kind` if given)."""
    while True:
        ex = shapes.make_example(rng, size, max_shapes=1)
        if kind is None or shapes.SHAPES[ex["shapes"][0]] == kind:
            return ex


def _shape_pixels(ex) -> tuple[np.ndarray, str, str]:
    """(mask of the shape's pixels, its colour name, its kind)."""
    name = list(shapes.COLORS)[ex["colors"][0]]
    mask = np.all(ex["image"] == np.asarray(shapes.COLORS[name], np.uint8), axis=-1)  # (H, W)
    return mask, name, shapes.SHAPES[ex["shapes"][0]]


def new_color_example(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """(image (size, size, 3) uint8, caption) of one shape in the new colour."""
    ex = _single(rng, size)
    mask, old, kind = _shape_pixels(ex)
    image = ex["image"].copy()
    image[mask] = NEW_COLOR[1]
    return image, ex["caption"].replace(f"a {old} {kind}", f"a {NEW_COLOR[0]} {kind}", 1)


def subject_example(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """(image, caption) of the subject: a square, left half yellow, right half blue."""
    ex = _single(rng, size, "square")
    mask, old, _ = _shape_pixels(ex)
    image, cx = ex["image"].copy(), int(ex["centers"][0][0])
    cols = np.arange(size)[None, :]  # (1, W)
    image[mask & (cols < cx)] = shapes.COLORS[SUBJECT_COLORS[0]]
    image[mask & (cols >= cx)] = shapes.COLORS[SUBJECT_COLORS[1]]
    return image, ex["caption"].replace(f"a {old} square", f"a {SUBJECT_TOKEN} square", 1)


def class_prompt(caption: str) -> str:
    """DreamBooth's class prompt of a subject caption: the rare token removed."""
    return caption.replace(f"{SUBJECT_TOKEN} ", "")


def ordinary_example(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, str]:
    """(image, caption) of an ordinary generator example (one or two shapes, training colours):
    the prompts (or images) of a prior for a concept a class prompt cannot drop (a new colour)."""
    ex = shapes.make_example(rng, size)
    return ex["image"], ex["caption"]


def examples(kind: str, n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """n (images (n, size, size, 3) uint8, captions) of `kind` "new_color" | "subject" |
    "ordinary"; example i comes from default_rng([seed, 15, i]) (an index stream the dataset
    splits do not use)."""
    make = {"new_color": new_color_example, "subject": subject_example,
            "ordinary": ordinary_example}  # fmt: skip
    if kind not in make:
        raise ValueError(f"unknown concept {kind!r}; valid: {sorted(make)}")
    pairs = [make[kind](np.random.default_rng([seed, 15, i]), size) for i in range(n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# ----------------------------------------------------------------------------- layouts


def layout_mask(record: dict, size: int, native: int = 32) -> np.ndarray:
    """(size, size) float32 silhouette of a generator record's shapes, drawn at the record's
    pixel size `native` and rescaled to `size` by nearest neighbour."""
    img = Image.new("L", (native, native), 0)
    draw = ImageDraw.Draw(img)
    for j in range(int(record["num_shapes"])):
        (cx, cy), r = record["centers"][j], int(record["radii"][j])
        shapes.draw_shape(draw, shapes.SHAPES[int(record["shapes"][j])], int(cx), int(cy), r, 255)
    if native != size:
        img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img, np.float32) / 255.0


def control_images(batch: dict, size: int, native: int = 32) -> np.ndarray:
    """(B, size, size, 3) control images in [0, 1] from a batch's layout features."""
    n = len(batch["num_shapes"])
    masks = [layout_mask({k: batch[k][i] for k in ("num_shapes", "shapes", "centers", "radii")},
                         size, native) for i in range(n)]  # fmt: skip
    return np.repeat(np.stack(masks)[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- measures


def _uint8(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8:
        x = np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255)
    return x.astype(np.float32)  # (N, H, W, 3) in 0..255


def foreground(images) -> np.ndarray:
    """(N, H, W) bool: pixels farther than FOREGROUND_DISTANCE from the median border colour."""
    x = _uint8(images)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)  # (N, 4W, 3)
    bg = np.median(border, axis=1)[:, None, None, :]  # (N, 1, 1, 3)
    return np.linalg.norm(x - bg, axis=-1) > FOREGROUND_DISTANCE


def nearest_colors(images) -> np.ndarray:
    """(N, H, W) index into PALETTE of each pixel's nearest palette colour."""
    x = _uint8(images)
    pal = np.asarray(list(PALETTE.values()), np.float32)  # (K, 3)
    return np.argmin(np.linalg.norm(x[..., None, :] - pal, axis=-1), axis=-1)


def color_fraction(images, color: str) -> np.ndarray:
    """(N,) share of foreground pixels whose nearest palette colour is `color` (0 if none)."""
    fg, idx = foreground(images), nearest_colors(images)
    hit = (idx == list(PALETTE).index(color)) & fg
    return hit.sum((1, 2)) / np.maximum(fg.sum((1, 2)), 1)


def is_subject(images) -> np.ndarray:
    """(N,) bool: the image shows the subject (see module docstring)."""
    fg, idx = foreground(images), nearest_colors(images)
    cols = np.arange(fg.shape[2])[None, None, :]  # (1, 1, W)
    out = []
    for f, i in zip(fg, idx):
        left, right = (f & (i == list(PALETTE).index(c)) for c in SUBJECT_COLORS)
        n = max(f.sum(), 1)
        ok = left.sum() >= 0.25 * n and right.sum() >= 0.25 * n
        ok = ok and (cols[0] * left).sum() / left.sum() < (cols[0] * right).sum() / right.sum()
        out.append(bool(ok))
    return np.asarray(out)


def mask_iou(images, masks) -> np.ndarray:
    """(N,) IoU of each image's foreground with its layout mask (N, H, W) in {0, 1}."""
    fg, m = foreground(images), np.asarray(masks) > 0.5
    return (fg & m).sum((1, 2)) / np.maximum((fg | m).sum((1, 2)), 1)
