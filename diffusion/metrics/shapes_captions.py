"""Shapes captions as the judge reads them: canonical attributes, the network's heads, scoring.

See shapes_judge.py for the judge itself; this file holds what does not need the network:
`parse_caption` (caption -> canonical attributes: "A below B" is "B above A"),
`labels_to_attributes` / `head_labels` (the generator's labels -> the same attributes / the
per-head training targets) and `score_readings` (the judge's readings vs what captions state).
"""

from __future__ import annotations

import re

import numpy as np

from diffusion.data.shapes import BACKGROUNDS, COLORS, RELATIONS, SHAPES

# Rows of the 3x3 grid the generator names a single shape's position with (shapes.py `_GRID`).
GRID = ("top left", "top", "top right", "left", "center", "right")
GRID += ("bottom left", "bottom", "bottom right")
CANONICAL_RELATIONS = ("above", "to the left of")
# What a caption states, canonically (module docstring); the values a reading can take.
ATTRIBUTES = {
    "count": (1, 2),
    "background": tuple(BACKGROUNDS),
    "shape1": SHAPES,
    "color1": tuple(COLORS),
    "position": GRID,
    "relation": CANONICAL_RELATIONS,
    "shape2": SHAPES,
    "color2": tuple(COLORS),
}
# What the network reads off an image: one head each. Two shapes may be separated both ways
# (one top-left, the other bottom-right: "A above B" and "A left of B" are both true), so the
# splits are two yes/no heads and each half has its own shape and colour heads, trained only on
# images where that split holds (a shape's bounding box inside a half: rows/columns < S/2 or
# >= S/2).
_HALVES = ("top", "bottom", "left", "right")
HEADS = {
    "count": (1, 2),
    "background": tuple(BACKGROUNDS),
    "shape": SHAPES,  # one shape: its kind, colour and grid cell
    "color": tuple(COLORS),
    "position": GRID,
    "vsplit": (False, True),  # two shapes, one in the top half and one in the bottom half
    "hsplit": (False, True),  # two shapes, one in the left half and one in the right half
} | {f"{a}_{h}": v for h in _HALVES for a, v in (("shape", SHAPES), ("color", tuple(COLORS)))}
_WORDS = {"a", "at", "the", "on", "background"} | {w for r in RELATIONS[1:] for w in r.split()}
_GRID_WORDS = {w for g in GRID for w in g.split()}
VOCABULARY = frozenset(_WORDS | _GRID_WORDS | set(SHAPES) | set(COLORS) | set(BACKGROUNDS))
FORMS = (
    "a <color> <shape> at the <position> on a <background> background",
    "a <color> <shape> <above|below|to the left of|to the right of> a <color> <shape> "
    "on a <background> background",
)
_SWAP = {"below": "above", "to the right of": "to the left of"}


# ----------------------------------------------------------------------------- captions


def _check_words(attrs: dict, caption: str) -> None:
    """Each slot of the caption holds a word of its kind (checked in the caption's word order)."""
    for k in ("color1", "shape1", "position", "color2", "shape2", "background"):
        valid = ATTRIBUTES[k]
        if k in attrs and attrs[k] not in valid:
            kind = k.rstrip("12")
            raise ValueError(f"expected a {kind} in {caption!r}, got {attrs[k]!r}; valid: {valid}")


def parse_caption(caption: str) -> dict:
    """Caption (any form the shapes generator writes) -> canonical attributes (module docstring).

    E.g. "a red circle below a blue square on a black background" -> {"count": 2, "background":
    "black", "shape1": "square", "color1": "blue", "relation": "above", "shape2": "circle",
    "color2": "red"}. Unknown words raise a ValueError naming the word and the vocabulary."""
    words = caption.lower().split()
    for w in words:
        if w not in VOCABULARY:
            raise ValueError(
                f"unknown word {w!r} in caption {caption!r}; vocabulary: {sorted(VOCABULARY)}"
            )
    text = " ".join(words)
    rel = "|".join(RELATIONS[1:])
    one = re.fullmatch(r"a (\w+) (\w+) at the (.+) on a (\w+) background", text)
    two = re.fullmatch(rf"a (\w+) (\w+) ({rel}) a (\w+) (\w+) on a (\w+) background", text)
    if one:
        color, shape, where, bg = one.groups()
        out = {"count": 1, "background": bg, "shape1": shape, "color1": color, "position": where}
    elif two:
        c1, s1, relation, c2, s2, bg = two.groups()
        if relation in _SWAP:  # "A below B" shows B above A
            (c1, s1), (c2, s2), relation = (c2, s2), (c1, s1), _SWAP[relation]
        out = {"count": 2, "background": bg, "shape1": s1, "color1": c1, "relation": relation}
        out.update(shape2=s2, color2=c2)
    else:
        raise ValueError(f"caption {caption!r} has none of the generator's forms: {FORMS}")
    _check_words(out, caption)
    return out


def _cell(x, y, size: int) -> int:
    """Index into GRID of the cell holding the centre (x, y), as the generator names it."""
    return 3 * min(3 * int(y) // size, 2) + min(3 * int(x) // size, 2)


def labels_to_attributes(example: dict, size: int = 32) -> dict:
    """The generator's labels of one example (shapes.make_example / the tfds features) ->
    canonical attributes, the same dict `parse_caption` gives for its caption."""
    n = int(example["num_shapes"])
    shapes = [SHAPES[int(i)] for i in example["shapes"][:n]]
    colors = [list(COLORS)[int(i)] for i in example["colors"][:n]]
    bg = list(BACKGROUNDS)[int(example["background"])]
    if n == 1:
        where = GRID[_cell(*example["centers"][0], size)]
        out = {"count": 1, "background": bg, "shape1": shapes[0], "color1": colors[0]}
        return out | {"position": where}
    relation = RELATIONS[int(example["relation"])]
    if relation in _SWAP:
        shapes, colors, relation = shapes[::-1], colors[::-1], _SWAP[relation]
    out = {"count": 2, "background": bg, "shape1": shapes[0], "color1": colors[0]}
    return out | {"relation": relation, "shape2": shapes[1], "color2": colors[1]}


def head_labels(example: dict, size: int = 32) -> np.ndarray:
    """The generator's labels of one example -> (len(HEADS),) int32 class index per head, -1
    where the head does not apply (training masks those out)."""
    n, half = int(example["num_shapes"]), size // 2
    kinds, colors = example["shapes"][:n], example["colors"][:n]
    (x, y), r = example["centers"][:n].T, example["radii"][:n]  # (n,) each
    out = {"count": n - 1, "background": int(example["background"])}
    if n == 1:
        where = _cell(x[0], y[0], size)
        out |= {"shape": int(kinds[0]), "color": int(colors[0]), "position": where}
    else:
        for split, c, (lo, hi) in (
            ("vsplit", y, ("top", "bottom")),
            ("hsplit", x, ("left", "right")),
        ):
            a, b = np.argsort(c, kind="stable")  # a: the shape nearer the top (left)
            holds = c[a] + r[a] < half and c[b] - r[b] >= half
            out[split] = int(holds)
            if holds:
                out |= {f"shape_{lo}": int(kinds[a]), f"color_{lo}": int(colors[a])}
                out |= {f"shape_{hi}": int(kinds[b]), f"color_{hi}": int(colors[b])}
    return np.array([out.get(k, -1) for k in HEADS], np.int32)


def _read(readings: dict, i: int, stated: dict) -> dict:
    """The judge's reading of image i for each attribute the caption states."""
    value = lambda head: HEADS[head][int(readings[head][i])]
    read = {"count": value("count"), "background": value("background")}
    if stated["count"] == 1:
        heads = {"shape1": "shape", "color1": "color", "position": "position"}
        return read | {k: value(h) for k, h in heads.items()}
    rel, other = stated["relation"], CANONICAL_RELATIONS[stated["relation"] == "above"]
    split, a, b = ("vsplit", "top", "bottom") if rel == "above" else ("hsplit", "left", "right")
    other_holds = value("hsplit" if split == "vsplit" else "vsplit")
    read["relation"] = rel if value(split) else other if other_holds else "neither"
    heads = {"shape1": f"shape_{a}", "color1": f"color_{a}", "shape2": f"shape_{b}"}
    return read | {k: value(h) for k, h in (heads | {"color2": f"color_{b}"}).items()}


# ----------------------------------------------------------------------------- scoring


def score_readings(readings: dict, captions) -> dict:
    """Compare the judge's readings with what each caption states (GenEval-style).

    readings: {head: (N,) class indices into HEADS[head]} for every head (`Judge.read`).
    Returns {"adherence": fraction of images whose every stated attribute matches,
    "accuracy": {attribute: fraction correct among captions stating it}, "num": {attribute:
    how many captions state it}, "records": one dict per image (caption, stated, read,
    correct, adherent) to annotate a grid with}."""
    captions = list(captions)
    for k in HEADS:
        if k not in readings or len(readings[k]) != len(captions):
            got = None if k not in readings else len(readings[k])
            raise ValueError(f"readings[{k!r}] needs {len(captions)} entries, got {got}")
    records, hits = [], {k: [] for k in ATTRIBUTES}
    for i, caption in enumerate(captions):
        stated = parse_caption(caption)
        read = _read(readings, i, stated)
        correct = {k: read[k] == v for k, v in stated.items()}
        for k, ok in correct.items():
            hits[k].append(ok)
        adherent = all(correct.values())
        records.append(
            dict(caption=caption, stated=stated, read=read, correct=correct)
            | {"adherent": adherent}
        )
    return {
        "adherence": float(np.mean([r["adherent"] for r in records])) if records else 0.0,
        "accuracy": {k: float(np.mean(v)) for k, v in hits.items() if v},
        "num": {k: len(v) for k, v in hits.items() if v},
        "records": records,
    }
