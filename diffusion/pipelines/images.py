"""Image and mask checks and conversions for the pipelines (host-side numpy; NHWC).

Images given to the pipelines are float (B, H, W, 3) in [0, 1] or uint8 in [0, 255] (a single
(H, W, 3) image is a batch of one); the networks see [-1, 1] (diffusers' VaeImageProcessor
`do_normalize`). Masks are (B, H, W) or (B, H, W, 1) in [0, 1], 1 = repaint, binarized at 0.5
as diffusers' mask processor does; their latent-resolution version takes every f-th pixel
(torch `interpolate(mode="nearest")`, diffusers' `prepare_mask_latents`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def check_size(height: int, width: int, factor: int) -> None:
    """Height and width must be positive multiples of the latent factor (VAE x patch size)."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int | np.integer) or v <= 0 or v % factor:
            raise ValueError(
                f"{name}={v!r} must be a positive multiple of {factor} (the VAE downsampling "
                f"factor times the patch size); e.g. {max(factor, (int(v) // factor) * factor)}"
            )


def as_unit_images(image, name: str = "image") -> np.ndarray:
    """float32 (B, H, W, 3) in [0, 1] from float [0, 1] or uint8 input; clear errors otherwise."""
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must be (B, H, W, 3) or (H, W, 3) RGB, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be float in [0, 1] or uint8, got dtype {arr.dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0 or not np.isfinite(arr).all():
        raise ValueError(
            f"{name} values must lie in [0, 1] (float) or [0, 255] (uint8); got range "
            f"[{lo:.3g}, {hi:.3g}]"
            + (" (looks like [-1, 1]: pass (x + 1) / 2)" if lo >= -1.0 and lo < 0 else "")
        )
    return arr.astype(np.float32)


def as_mask(mask, batch: int, height: int, width: int) -> np.ndarray:
    """Binarized float32 (B, H, W, 1) mask (1 = repaint) from (B|1, H, W[, 1]) in [0, 1]."""
    arr = np.asarray(mask)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or arr.shape[1:] != (height, width) or arr.shape[0] not in (1, batch):
        raise ValueError(
            f"mask must be (B, H, W) or (B, H, W, 1) with B in (1, {batch}) and H, W = "
            f"{height}, {width} (the image size); got shape {np.shape(mask)}"
        )
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0 or not np.isfinite(arr).all():
        raise ValueError(f"mask values must lie in [0, 1]; got range [{lo:.3g}, {hi:.3g}]")
    binary = (arr >= 0.5).astype(np.float32)
    return np.broadcast_to(binary, (batch, height, width))[..., None].copy()


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(B, H, W, 1) pixel mask -> (B, H/f, W/f, 1): nearest neighbour (every f-th pixel)."""
    return mask[:, ::factor, ::factor]


def to_model_range(images) -> jax.Array:
    """[0, 1] -> [-1, 1]."""
    return 2.0 * jnp.asarray(images, jnp.float32) - 1.0


def to_unit_range(x) -> jax.Array:
    """[-1, 1] network output -> [0, 1], clipped (diffusers' postprocess, output_type="np")."""
    return jnp.clip(x.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)


def resize(x, height: int, width: int, method: str = "bilinear") -> jax.Array:
    """NHWC resize (jax.image.resize; antialiased when shrinking)."""
    methods = ("nearest", "bilinear", "bicubic", "lanczos3")
    if method not in methods:
        raise ValueError(f"unknown resize method {method!r}; valid: {methods}")
    x = jnp.asarray(x)
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method=method)


def to_uint8(images) -> np.ndarray:
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(image, path: str) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(image)).save(path)


def save_gif(frames, path: str, *, duration_ms: int = 120) -> None:
    """Animated GIF (looping) of (F, H, W, 3) frames in [0, 1]."""
    from PIL import Image

    pics = [Image.fromarray(f) for f in to_uint8(frames)]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=duration_ms, loop=0)


def load_image(path: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from an image file (masks: convert to grayscale first)."""
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"no image file {path}")
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def load_mask(path: str) -> np.ndarray:
    """(H, W) float32 in [0, 1] from an image file (grayscale; white = repaint)."""
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"no mask file {path}")
    return np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
