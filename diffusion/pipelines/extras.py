"""Hi-res fix, prompt travel and Composable Diffusion on top of the three core methods.

hires_fix                 text_to_image at the base size, upscale (latent: bilinear resize of
                          the latents; pixel: decode, bicubic resize, re-encode), then
                          image_to_image at `strength`; large outputs decode tile by tile
                          (AutoencoderKL.decode_tiled) when tile_size is given.
prompt_travel             frames between two prompts: text conditioning interpolated
                          linearly, initial latents spherically (slerp; Shoemake 1985), all
                          frames generated in batches of batch_size with one program.
composable_text_to_image  Liu et al. 2022 (Composable Diffusion, eq. 11): "a AND b :0.5";
                          pred_u + scale * sum_i w_i (pred_i - pred_u), one batched call.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.pipelines import images


def slerp(a, b, w):
    """Spherical interpolation between noise tensors a and b: (F, *a.shape) for weights w."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    w = jnp.asarray(w, jnp.float32).reshape(-1, *([1] * a.ndim))  # (F, 1, ...)
    cos = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    lerp = (1 - w) * a + w * b
    sin = jnp.sin(theta)
    arc = (jnp.sin((1 - w) * theta) * a + jnp.sin(w * theta) * b) / jnp.where(sin > 0, sin, 1.0)
    return jnp.where(sin > 1e-6, arc, lerp)  # (F, ...) parallel vectors: plain lerp


def parse_composable(prompt: str) -> list[tuple[str, float]]:
    """'a red cube AND a ball :0.5' -> [('a red cube', 1.0), ('a ball', 0.5)]."""
    parts = []
    for part in re.split(r"\s+AND\s+", prompt.strip()):
        m = re.fullmatch(r"(.*?)\s*:\s*(-?[0-9]*\.?[0-9]+)\s*", part)
        text, weight = (m.group(1), float(m.group(2))) if m else (part, 1.0)
        if not text:
            raise ValueError(f"empty sub-prompt in composable prompt {prompt!r}")
        parts.append((text, weight))
    return parts


@nnx.jit(static_argnums=(2,))
def _decode(vae, latents, factors):
    scale, shift = factors
    return images.to_unit_range(vae.decode(latents / scale + shift))


class Extras:
    """Mixin of pipeline.Pipeline."""

    def decode_latents(self, latents, *, tile_size: int | None = None, overlap: int = 8):
        """Images in [0, 1] of scaled latents; tile by tile when tile_size (latent pixels)."""
        if self.vae is None:
            return np.asarray(images.to_unit_range(jnp.asarray(latents)))
        scale, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor or 0.0
        if tile_size:
            x = self.vae.decode_tiled(jnp.asarray(latents) / scale + shift, tile_size, overlap)
            return np.asarray(images.to_unit_range(x))
        return np.asarray(_decode(self.vae, jnp.asarray(latents), (scale, shift)))

    def hires_fix(self, prompt=None, *, scale: float = 2.0, upscale: str = "latent",
                  strength: float = 0.5, height=None, width=None, num_steps: int = 50,
                  hires_steps: int | None = None, tile_size: int | None = None, rng=None,
                  latents=None, **kw):  # fmt: skip
        """Images (B, scale*H, scale*W, 3): base pass, upscale, image_to_image at strength.
        Keyword arguments (negative_prompt, guidance_scale, method...) go to both passes."""
        if upscale not in ("latent", "pixel"):
            raise ValueError(f"upscale must be 'latent' or 'pixel', got {upscale!r}")
        if not scale >= 1.0:
            raise ValueError(f"hi-res scale must be >= 1, got {scale!r}")
        height, width = self.resolve_size(height, width)
        f = self.size_factor
        big_h, big_w = (int(round(s * scale / f)) * f for s in (height, width))
        keys = self._keys(rng)
        z = self.text_to_image(prompt, height=height, width=width, num_steps=num_steps,
                               rng=keys[0], latents=latents, output="latent", **kw)  # fmt: skip
        second = dict(prompt=prompt, strength=strength, num_steps=hires_steps or num_steps,
                      rng=keys[1], **kw)  # fmt: skip
        v = self.vae_scale_factor
        if upscale == "latent":
            big = images.resize(z, big_h // v, big_w // v, "bilinear")
            out = self.image_to_image(image_latents=big, output="latent", **second)
        else:
            small = self.decode_latents(z)
            big = np.clip(np.asarray(images.resize(small, big_h, big_w, "bicubic")), 0.0, 1.0)
            out = self.image_to_image(image=big, output="latent", **second)
        return self.decode_latents(out, tile_size=tile_size)

    def prompt_travel(self, prompt: str, to_prompt: str, *, frames: int = 8, batch_size: int = 4,
                      negative_prompt=None, height=None, width=None, guidance_scale=None,
                      rng=None, latents=None, to_latents=None, clip_skip=None, progress=None,
                      **kw):  # fmt: skip
        """(frames, H, W, 3): frame i at w = i / (frames - 1) from prompt to to_prompt.
        progress: optional callable(frames done) after each batch."""
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an integer >= 2, got {frames!r}")
        height, width = self.resolve_size(height, width)
        scale, guided = self._guided(guidance_scale)
        family = ("original_size", "crops_coords_top_left", "target_size", "max_sequence_length")
        extra = {k: kw.pop(k) for k in family if k in kw}
        enc = dict(guided=guided, clip_skip=clip_skip, height=height, width=width, **extra)
        cond_a, uncond = self.encode_prompt(prompt, negative_prompt, **enc)
        cond_b, _ = self.encode_prompt(to_prompt, negative_prompt, **{**enc, "guided": False})
        w = np.linspace(0.0, 1.0, frames, dtype=np.float32)

        def lerp(a, b):  # (1, ...) -> (F, ...)
            wv = w.reshape(-1, *([1] * (a.ndim - 1)))
            return (1 - wv) * a + wv * b

        conds = jax.tree.map(lerp, cond_a, cond_b)
        keys = self._keys(rng)
        shape = self._latent_shape(1, height, width)
        za = self._noise(latents, keys[0], shape, "latents")
        zb = self._noise(to_latents, keys[1], shape, "to_latents")
        noise = slerp(za[0], zb[0], w)  # (F, h, w, C)
        out = []
        un = None
        if uncond is not None:
            un = jax.tree.map(lambda x: jnp.repeat(x, batch_size, 0), uncond)
        for start in range(0, frames, batch_size):  # pad the last batch: one program shape
            idx = np.minimum(np.arange(start, start + batch_size), frames - 1)
            cond = {k: v[idx] for k, v in conds.items()}
            imgs = self.text_to_image(
                conditioning=(cond, un), latents=noise[idx], height=height, width=width,
                guidance_scale=scale, rng=keys[2], **kw,
            )  # fmt: skip
            out.append(imgs[: frames - start])
            if progress is not None:
                progress(min(start + batch_size, frames))
        return np.concatenate(out)[:frames]

    def composable_text_to_image(self, prompt: str, *, negative_prompt=None, height=None,
                                 width=None, num_steps=50, guidance_scale=None, method=None,
                                 grid=None, rng=None, latents=None, num_images_per_prompt=1,
                                 sampler_options=None, clip_skip=None, **kw):  # fmt: skip
        """Composable Diffusion: sub-prompts joined with AND, each optionally ending in
        ':weight' (default 1); guidance_scale multiplies every weight."""
        parts = parse_composable(prompt)
        height, width = self.resolve_size(height, width)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        enc = dict(num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
                   height=height, width=width, **kw)  # fmt: skip
        conds = [self.encode_prompt(text, guided=False, **enc)[0] for text, _ in parts]
        _, uncond = self.encode_prompt(parts[0][0], negative_prompt, **enc)
        cond = jax.tree.map(lambda *xs: jnp.stack(xs), *conds)  # (K, B, ...)
        batch = uncond["encoder_hidden_states"].shape[0]
        method, options, ts = self._times(num_steps, method, grid, sampler_options)
        keys = self._keys(rng)
        noise = self._noise(latents, keys[0], self._latent_shape(batch, height, width), "latents")
        setting = self._setting(method, options, ts, True, 0.0, composable=True,
                                init_scale=self.scheduler.init_scale(ts))  # fmt: skip
        weights = jnp.asarray([w for _, w in parts], jnp.float32)
        inputs = {"cond": cond, "uncond": uncond, "noise": noise, "weights": weights}
        return self._output(self._execute(setting, inputs, scale, keys[3], batch), "image")
