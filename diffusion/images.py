"""Image grids for people to look at: samples in [-1, 1] -> PNG, originals above reconstructions.

images.save_grid(samples, "samples.png", ncol=8)
images.save_grid(images.paired_rows(x, recon, 8), "recon.png", 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

GRID_COLUMNS = 8  # sample grids without class columns


def save_grid(images, path, ncol=GRID_COLUMNS, pad=2):
    """(N, H, W, C) images in [-1, 1] -> a PNG grid, row-major, ncol per row; each image upscaled
    (nearest) to at least 32 px and separated by pad grey pixels."""
    x = np.asarray(jnp.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)
    scale = max(2, 32 // x.shape[2])
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = x.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, np.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = x[i]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def paired_rows(originals: jax.Array, recons: jax.Array, ncol: int) -> jax.Array:
    """(N, H, W, C) x 2 -> (2 * ceil(N / ncol) * ncol, H, W, C): each row of ncol originals is
    followed by the row of their reconstructions; a short last row is padded with grey (0)."""
    n = originals.shape[0]
    pad = [(0, -n % ncol)] + [(0, 0)] * (originals.ndim - 1)
    o, r = jnp.pad(originals, pad), jnp.pad(recons, pad)
    rows = lambda a: a.reshape(-1, ncol, *a.shape[1:])  # (R, ncol, H, W, C)
    return jnp.stack([rows(o), rows(r)], axis=1).reshape(-1, *o.shape[1:])  # (2 R ncol, H, W, C)


def save_prompt_grid(samples, prompts, marks, path, text_width=360, pad=3):
    """(P, N, H, W, 3) samples in [-1, 1] -> a PNG with one row per prompt: the prompt's text,
    then its N samples (upscaled to at least 64 px), each framed green (mark True, e.g. the
    judge found every attribute) or red."""
    p, n, h, w, _ = samples.shape
    x = np.asarray(np.clip((np.asarray(samples) + 1.0) * 127.5, 0, 255), np.uint8)
    k = max(1, 64 // w)
    cell_h, cell_w = h * k + 2 * pad, w * k + 2 * pad
    canvas = Image.new("RGB", (text_width + n * cell_w, p * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(p):
        top = i * cell_h
        draw.text((4, top + cell_h // 2 - 6), str(prompts[i]), fill=(0, 0, 0))
        for j in range(n):
            left = text_width + j * cell_w
            frame = (0, 170, 0) if marks[i][j] else (210, 0, 0)
            draw.rectangle([left, top, left + cell_w - 1, top + cell_h - 1], fill=frame)
            tile = Image.fromarray(x[i, j]).resize((w * k, h * k), Image.NEAREST)
            canvas.paste(tile, (left + pad, top + pad))
    canvas.save(path)
