"""text_to_image, image_to_image (SDEdit) and inpaint: the pipeline methods diffusers users know.

Arguments follow diffusers' `__call__`s (prompt, negative_prompt, height, width, num_steps =
num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, clip_skip,
latents), plus `method` / `grid` / `sampler_options` (any of samplers.SAMPLERS and GRIDS; None
= the folder's scheduler) and `rng` (a jax key or int seed; default key 0). Random draws
are split from rng in a fixed layout (noise, image posterior, masked-image posterior,
sampler), and each can be given explicitly (`latents` / `noise`, `image_noise`,
`masked_image_noise`: NHWC standard normals at the latent size; `sampler_noises`: a stochastic
method's `noises` option, e.g. (num_steps, B, h, w, C)) to reproduce diffusers'
torch-generator draws. guidance_scale <= 1 runs no unconditional pass (as diffusers).
"""

from __future__ import annotations

import jax
import numpy as np

from diffusion.pipelines import images


class Generation:
    """Mixin of pipeline.Pipeline (uses its _times / _setting / _execute helpers)."""

    def text_to_image(
        self, prompt=None, *, negative_prompt=None, height=None, width=None, num_steps=50,
        guidance_scale=None, guidance_rescale=0.0, method=None, grid=None, rng=None,
        latents=None, num_images_per_prompt=1, clip_skip=None, sampler_options=None,
        output="image", conditioning=None, control_image=None,
        controlnet_conditioning_scale=1.0, sampler_noises=None, **kw,
    ):  # fmt: skip
        """Images (B, H, W, 3) in [0, 1] from noise; latents as diffusers' `latents` (scaled by
        the scheduler's init_noise_sigma as there). conditioning=(cond, uncond) skips the text
        encoders (see encode_prompt). control_image (ControlNet pipelines, adapters.py): NHWC in
        [0, 1] at the output size (which it sets when height and width are not given)."""
        if control_image is not None and height is None and width is None:
            height, width = np.shape(control_image)[-3:-1]
        height, width = self.resolve_size(height, width)
        scale, cond, uncond, batch = self._prompt_batch(
            prompt, negative_prompt, guidance_scale, conditioning, num_images_per_prompt,
            clip_skip, height, width, kw,
        )  # fmt: skip
        cond, uncond = self._control(cond, uncond, control_image, controlnet_conditioning_scale,
                                     batch, height, width)  # fmt: skip
        method, options, ts = self._times(num_steps, method, grid, sampler_options)
        keys = self._keys(rng)
        shape = self._latent_shape(batch, height, width)
        noise = self._noise(latents, keys[0], shape, "latents")
        setting = self._setting(
            method, options, ts, uncond is not None, guidance_rescale,
            init_scale=self.scheduler.init_scale(ts), output=output,
        )  # fmt: skip
        inputs = {"cond": cond, "noise": noise} | ({"uncond": uncond} if setting.guided else {})
        inputs |= _sampler_noises(sampler_noises)
        return self._output(self._execute(setting, inputs, scale, keys[3], batch), output)

    def image_to_image(
        self, prompt=None, image=None, *, strength=0.8, noise=None, image_noise=None,
        image_latents=None, negative_prompt=None, num_steps=50, guidance_scale=None,
        guidance_rescale=0.0, method=None, grid=None, rng=None, num_images_per_prompt=1,
        clip_skip=None, sampler_options=None, output="image", conditioning=None,
        sampler_noises=None, **kw,
    ):  # fmt: skip
        """SDEdit (Meng et al. 2022): encode `image` (float [0, 1] or uint8, (B, H, W, 3)),
        add `noise` at the grid time int(num_steps * strength) steps from the end, denoise.
        image_latents (scaled latents) replaces image (no VAE encode; e.g. hi-res fix)."""
        method, options, full = self._times(num_steps, method, grid, sampler_options)
        ts = self._truncate(full, strength)
        if image_latents is not None:
            f = self.vae_scale_factor
            height, width = image_latents.shape[1] * f, image_latents.shape[2] * f
            pixels = None
        else:
            if image is None:
                raise ValueError("image_to_image needs an image (or image_latents)")
            pixels = images.as_unit_images(image)
            height, width = pixels.shape[1:3]
        images.check_size(height, width, self.size_factor)
        scale, cond, uncond, batch = self._prompt_batch(
            prompt, negative_prompt, guidance_scale, conditioning, num_images_per_prompt,
            clip_skip, height, width, kw,
        )  # fmt: skip
        keys, shape = self._keys(rng), self._latent_shape(batch, height, width)
        inputs = {"cond": cond, "noise": self._noise(noise, keys[0], shape, "noise")}
        if pixels is not None:
            inputs["image"] = images.to_model_range(self._batch(pixels, batch, "image"))
            inputs["image_noise"] = self._noise(image_noise, keys[1], shape, "image_noise")
        else:
            inputs["z0"] = self._check_array(self._batch(image_latents, batch, "image_latents"),
                                             shape, "image_latents")  # fmt: skip
        if uncond is not None:
            inputs["uncond"] = uncond
        setting = self._setting(
            method, options, ts, "uncond" in inputs, guidance_rescale, from_noise=False,
            encode=pixels is not None, output=output,
        )  # fmt: skip
        inputs |= _sampler_noises(sampler_noises)
        return self._output(self._execute(setting, inputs, scale, keys[3], batch), output)

    def inpaint(
        self, prompt=None, image=None, mask=None, *, strength=1.0, latents=None, noise=None,
        image_noise=None, masked_image_noise=None, negative_prompt=None, num_steps=50,
        guidance_scale=None, guidance_rescale=0.0, method=None, grid=None, rng=None,
        num_images_per_prompt=1, clip_skip=None, sampler_options=None, output="image",
        conditioning=None, sampler_noises=None, **kw,
    ):  # fmt: skip
        """Repaint where mask = 1 ((B, H, W[, 1]) in [0, 1], binarized at 0.5). A U-Net with
        in_channels = 2 * latent + 1 (SD inpainting, 9 channels) sees [x, mask, masked-image
        latents]; any other denoiser keeps the known region by replacement (programs.py).
        latents (strength 1) is diffusers' `latents`, i.e. the same as noise."""
        if latents is not None and noise is not None:
            raise ValueError("pass latents or noise, not both (for inpainting they are the same)")
        noise = latents if latents is not None else noise
        mode = self.inpaint_mode()
        if image is None or mask is None:
            raise ValueError("inpaint needs an image and a mask")
        pixels = images.as_unit_images(image)
        height, width = pixels.shape[1:3]
        images.check_size(height, width, self.size_factor)
        method, options, full = self._times(num_steps, method, grid, sampler_options)
        ts = self._truncate(full, strength)
        scale, cond, uncond, batch = self._prompt_batch(
            prompt, negative_prompt, guidance_scale, conditioning, num_images_per_prompt,
            clip_skip, height, width, kw,
        )  # fmt: skip
        keys, shape = self._keys(rng), self._latent_shape(batch, height, width)
        pixels = images.to_model_range(self._batch(pixels, batch, "image"))
        binary = images.as_mask(mask, batch, height, width)  # (B, H, W, 1), 1 = repaint
        inputs = {"cond": cond, "noise": self._noise(noise, keys[0], shape, "noise"),
                  "mask": images.latent_mask(binary, self.vae_scale_factor)}  # fmt: skip
        from_noise = strength == 1.0
        if not from_noise or mode == "replace":
            inputs["image"] = pixels
            inputs["image_noise"] = self._noise(image_noise, keys[1], shape, "image_noise")
        if mode == "concat":
            inputs["masked_image"] = pixels * (binary < 0.5)
            inputs["masked_image_noise"] = self._noise(
                masked_image_noise, keys[2], shape, "masked_image_noise"
            )
        if uncond is not None:
            inputs["uncond"] = uncond
        setting = self._setting(
            method, options, ts, "uncond" in inputs, guidance_rescale, from_noise=from_noise,
            encode="image" in inputs, inpaint=mode, output=output,
            init_scale=self.scheduler.init_scale(full),
        )  # fmt: skip
        inputs |= _sampler_noises(sampler_noises)
        return self._output(self._execute(setting, inputs, scale, keys[3], batch), output)

    # ------------------------------------------------------------------ helpers
    def _prompt_batch(self, prompt, negative_prompt, guidance_scale, conditioning,
                      num_images_per_prompt, clip_skip, height, width, kw):  # fmt: skip
        """(scale, cond, uncond or None when unguided, batch size)."""
        scale, guided = self._guided(guidance_scale)
        cond, uncond = conditioning or self.encode_prompt(
            prompt, negative_prompt, guided=guided, num_images_per_prompt=num_images_per_prompt,
            clip_skip=clip_skip, height=height, width=width, **kw,
        )  # fmt: skip
        return scale, cond, uncond if guided else None, cond["encoder_hidden_states"].shape[0]

    def inpaint_mode(self) -> str:
        cfg, lc = self.denoiser.config, self.latent_channels
        if cfg.in_channels == 2 * lc + 1:
            return "concat"
        if cfg.in_channels == lc:
            return "replace"
        raise ValueError(
            f"the denoiser takes {cfg.in_channels} input channels: inpainting needs {lc} "
            f"(mask replacement) or {2 * lc + 1} (an inpainting U-Net)"
        )

    def _noise(self, given, key, shape, name):
        if given is None:
            return jax.random.normal(key, shape, np.float32)
        return self._check_array(given, shape, name)

    @staticmethod
    def _batch(x, batch: int, name: str):
        """Repeat a batch of one to `batch` (diffusers duplicates a single image per prompt)."""
        if x.shape[0] == batch:
            return x
        if x.shape[0] == 1:
            return np.repeat(np.asarray(x), batch, axis=0)
        raise ValueError(f"{name} has batch {x.shape[0]}; the prompts make a batch of {batch}")

    @staticmethod
    def _output(out, output: str):
        if output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
        return np.asarray(out, np.float32) if output == "image" else out


def _sampler_noises(noises) -> dict:
    """A stochastic sampler's injected normals as a program input (sample() checks the shape)."""
    return {} if noises is None else {"sampler_noises": np.asarray(noises, np.float32)}
