"""The frozen VAE of a latent diffusion model (Rombach et al. 2022): its latents, cache and scale.

    space = LatentSpace.load("/runs/shapes_vae")        # a VAE training workdir, or a diffusers
                                                        # AutoencoderKL folder
    z = space.encode(images)                            # (B, h, w, c) scaled latents
    x = space.decode(z)                                 # images in [-1, 1]

Latents are the posterior mode, scaled as diffusers does: (z - shift_factor) * scaling_factor.
The scaling factor is "auto" (1 / std of the unscaled latents of the first `SCALE_IMAGES` train
images, so the diffusion model sees unit-variance data; the VAE's own config value for a
diffusers folder) or a number. `cache` encodes a dataset once into a tfds latent dataset named
after the VAE's weights (so a retrained VAE never reads stale latents); training reads that.
Encode / decode are jitted with the VAE's parameters as arguments (never baked into programs).
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import data, models

SCALE_IMAGES = 2048


def _load_vae(path: str):
    """(AutoencoderKL, source description) from a VAE workdir or a diffusers folder."""
    from diffusion import tasks, train_state
    from diffusion.workdir import read_config

    if not os.path.isdir(path):
        raise FileNotFoundError(f"VAE path {path!r} does not exist (a VAE training workdir or a "
                                "diffusers AutoencoderKL folder)")  # fmt: skip
    config_json = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.exists(config_json):
        cfg = read_config(path)
        if cfg.task != "autoencoder":
            raise ValueError(f"{path} is a training workdir of task {cfg.task!r}, not a VAE")
        vae, step = train_state.restore_ema(cfg, tasks.from_config(cfg), path)
        return vae, f"workdir {path}, EMA weights of step {step}"
    if os.path.exists(config_json):
        name = models.read_config(path).get("_class_name")
        if name != "AutoencoderKL":
            raise ValueError(f"{path} holds a {name!r}, not an AutoencoderKL")
        return models.load_diffusers(path), f"diffusers folder {path}"
    raise ValueError(f"{path} is neither a VAE training workdir nor a diffusers VAE folder")


class LatentSpace:
    """A frozen AutoencoderKL and the affine map between its posterior mode and model latents."""

    def __init__(self, vae, scaling_factor: float, shift_factor: float = 0.0, source: str = ""):
        self.vae, self.source = vae, source
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)
        self._graph, self._params = nnx.split(vae)
        self.factor = vae.config.downsample_factor
        self.channels = vae.config.latent_channels

        def encode(params, x):
            return nnx.merge(self._graph, params).encode(x).mode()

        def decode(params, z):
            return nnx.merge(self._graph, params).decode(z)

        self._encode, self._decode = jax.jit(encode), jax.jit(decode)

    @classmethod
    def load(cls, path: str, scaling_factor="auto", dataset=None, data_dir=None) -> LatentSpace:
        """The VAE at `path`; "auto" scaling measures 1/std on `dataset`'s first train images
        (a diffusers folder keeps the scaling_factor / shift_factor its config states)."""
        vae, source = _load_vae(path)
        shift = vae.config.shift_factor or 0.0
        if scaling_factor == "auto" and os.path.exists(os.path.join(path, "checkpoints")):
            return cls(vae, measure_scale(vae, dataset, data_dir), 0.0, source)
        scale = vae.config.scaling_factor if scaling_factor == "auto" else float(scaling_factor)
        return cls(vae, scale, shift, source)

    def encode_unscaled(self, images) -> np.ndarray:
        """Posterior modes (B, h, w, c) of images (B, H, W, 3) in [-1, 1], in batches of 256."""
        out = [self._encode(self._params, jnp.asarray(images[i : i + 256]))
               for i in range(0, len(images), 256)]  # fmt: skip
        return np.concatenate([np.asarray(o) for o in out])

    def scale(self, z):
        return (z - self.shift_factor) * self.scaling_factor

    def encode(self, images) -> np.ndarray:
        return self.scale(self.encode_unscaled(images))

    def decode(self, latents) -> jax.Array:
        """Images in [-1, 1] (B, H, W, 3) from scaled latents (B, h, w, c)."""
        z = jnp.asarray(latents) / self.scaling_factor + self.shift_factor
        return self._decode(self._params, z)

    def fingerprint(self) -> str:
        """A short hash of the VAE's weights (names the latent cache)."""
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(self._params):
            h.update(np.asarray(leaf).tobytes())
        return h.hexdigest()[:12]

    def cache(self, dataset: str, data_dir=None, image_size=None) -> tuple[str, str]:
        """Encode every split of `dataset` once (unscaled posterior modes); returns the
        (name, data_dir) that data.make_pipeline reads. Reuses an existing cache."""
        cache_dir = os.path.join(data_dir or data.default_data_dir(), "latent_caches")
        name = f"latents_{self.fingerprint()}"
        data.cache_latents(
            dataset,
            lambda x: np.asarray(self._encode(self._params, jnp.asarray(x))),
            cache_dir,
            name=name,
            data_dir=data_dir,
            batch_size=256,
            image_size=image_size,
        )
        return name, cache_dir


def measure_scale(vae, dataset: str | None, data_dir=None) -> float:
    """1 / std of the VAE's unscaled latents of `dataset`'s first SCALE_IMAGES train images."""
    if dataset is None:
        raise ValueError("scaling_factor='auto' needs the dataset to measure it on")
    z = LatentSpace(vae, 1.0).encode_unscaled(_first_images(dataset, data_dir, SCALE_IMAGES))
    return 1.0 / float(np.std(z))


def _first_images(dataset: str, data_dir, n: int) -> np.ndarray:
    source = data.load_source(dataset, "train", data_dir)
    records = source.__getitems__(list(range(min(n, len(source)))))
    return np.stack([data.preprocess_image(r["image"]) for r in records])  # (n, H, W, C)
