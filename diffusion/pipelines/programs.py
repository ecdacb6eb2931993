"""The compiled generation program: initial state -> sampler loop -> VAE decode, one XLA program.

`generate(setting, graphdefs, states, inputs, scale, rng)` is jitted with `setting` and the
module graph definitions static, the weights (`states`) as arguments (never baked in as
constants), and everything that varies between calls of the same shape traced: latents / noise,
text conditioning, guidance scale, images and masks. The sampler loop is one `lax.scan`
(samplers.sample), so compile time does not grow with the number of steps.

Starting states (schedules.py convention x_t = alpha_t x0 + sigma_t eps, grid ts):
    from noise   x_T = init_scale * noise   (diffusers' latents * init_noise_sigma; see
                 schedulers.SchedulerSpec.init_scale)
    from image   z0 = (E(image) - shift) * scale with E(image) = mean + std * image_noise (a
                 posterior sample, as diffusers' `retrieve_latents`), x = alpha z0 + sigma noise
                 at ts[0] (SDEdit, Meng et al. 2022; diffusers' add_noise / scale_noise)
Inpainting (Rombach et al. 2022, sec. 4.5 / diffusers StableDiffusionInpaintPipeline):
    "concat"   9-channel U-Net input [x, mask, masked-image latents]
    "replace"  an ordinary model; before every network call after the first the known region
               (mask 0) of the input is replaced by add_noise(z0, noise, t), and the output's
               known region is z0: what diffusers does after each scheduler step. Exact for any
               sampler whose update acts elementwise on the state (all in SAMPLERS), since the
               known region of our state then only enters through the network input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import predictions, samplers
from diffusion.pipelines import images, quantize
from diffusion.samplers import guidance
from diffusion.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything static about one generation program (hashable: a jit static argument)."""

    kind: str  # "unet" | "mmdit"
    method: str
    options: tuple[tuple[str, Any], ...]
    ts: tuple[float, ...]  # the time grid, decreasing
    schedule: Schedule
    prediction_type: str
    guided: bool  # classifier-free guidance (an unconditional pass)
    rescale: float = 0.0  # guidance rescale phi
    init_scale: float = 1.0
    from_noise: bool = True  # x_T = init_scale * noise; else add noise to z0 at ts[0]
    encode: bool = False  # z0 from inputs["image"] (else inputs["z0"] if needed)
    inpaint: str | None = None  # None | "concat" | "replace"
    output: str = "image"  # "image" in [0, 1] | "latent"
    composable: bool = False  # cond leaves (K, B, ...), inputs["weights"] (K,)
    quantized: bool = False
    vae_factors: tuple[float, float] = (1.0, 0.0)  # (scaling_factor, shift_factor)


def network_call(kind: str, net, x, model_time, cond):
    """The denoiser on diffusers-named conditioning (see prompts.py for the keys)."""
    if kind == "mmdit":
        return net(x, cond["encoder_hidden_states"], cond["pooled_projections"], model_time)
    t = jnp.broadcast_to(jnp.asarray(model_time, jnp.float32), (x.shape[0],))
    if "concat" in cond:  # inpainting U-Net: [latents, mask, masked-image latents]
        x = jnp.concatenate([x, cond["concat"].astype(x.dtype)], axis=-1)
    added = None
    if "time_ids" in cond:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    control = {}
    if "controlnet_cond" in cond:  # a models.controlnet.ControlledUNet
        control = {k: cond[k] for k in ("controlnet_cond", "conditioning_scale")}
    return net(x, t, cond["encoder_hidden_states"], added_cond_kwargs=added, **control)


def composable_model(model_fn, conds, uncond, weights):
    """Composable Diffusion (Liu et al. 2022, eq. 11): pred_u + sum_i w_i (pred_i - pred_u), the
    K conditional passes and the unconditional one batched in one call. conds: leaves (K, B, ...);
    uncond: leaves (B, ...); weights (K,) (guidance scale included)."""

    def guided(x, model_time):
        b, k = x.shape[0], weights.shape[0]
        c = jax.tree.map(
            lambda u, ck: jnp.concatenate([u, ck.reshape(k * b, *ck.shape[2:])], 0), uncond, conds
        )  # ((K + 1) B, ...)
        out = model_fn(jnp.concatenate([x] * (k + 1), 0), model_time, c)
        out = out.reshape(k + 1, b, *out.shape[1:])  # (K + 1, B, ...)
        return out[0] + jnp.tensordot(weights.astype(out.dtype), out[1:] - out[0], axes=1)

    return guided


def _encode(vae, setting: Setting, image, eps):
    """Scaled latents of [-1, 1] images from the posterior sample mean + std * eps."""
    scale, shift = setting.vae_factors
    if vae is None:
        return image
    post = vae.encode(image)
    return (post.mean + post.std * eps - shift) * scale


def _decode(vae, setting: Setting, latents):
    scale, shift = setting.vae_factors
    x = latents if vae is None else vae.decode(latents / scale + shift)
    return images.to_unit_range(x)


def _replace_known(denoise_fn, schedule, t_first, z0, noise, keep):
    """diffusers' 4-channel inpainting: known region (keep = 1 - mask) of the network input
    re-noised from z0 at t (after the first step), and of the output set to z0."""

    def fn(x_t, t):
        a, s = schedule.alpha(t).astype(x_t.dtype), schedule.sigma(t).astype(x_t.dtype)
        known = a * z0 + s * noise
        x_in = jnp.where(t < t_first, keep * known + (1 - keep) * x_t, x_t)
        return keep * z0 + (1 - keep) * denoise_fn(x_in, t)

    return fn


def _network(setting: Setting, den_def, den_state):
    """x -> (network, x). int8 weights are dequantized inside each call, behind an
    optimization barrier tied to x: otherwise XLA hoists the dequantization out of the sampling
    loop and holds every float32 kernel for the whole run (no memory saved)."""
    if not setting.quantized:
        net = nnx.merge(den_def, den_state)
        return lambda x: (net, x)

    def get(x):
        state, x = jax.lax.optimization_barrier((den_state, x))
        return nnx.merge(den_def, quantize.dequantize(state)), x

    return get


def _guided_model(setting: Setting, get_net, inputs, scale):
    model_fn = lambda x, mt, c: network_call(setting.kind, *get_net(x), mt, c)
    cond, uncond = inputs["cond"], inputs.get("uncond")
    if setting.inpaint == "concat":
        extra = inputs["concat"]
        if setting.composable:  # cond leaves are (K, B, ...)
            cond = {**cond, "concat": jnp.broadcast_to(extra, (inputs["weights"].shape[0],
                                                               *extra.shape))}  # fmt: skip
        else:
            cond = {**cond, "concat": extra}
        uncond = None if uncond is None else {**uncond, "concat": extra}
    if setting.composable:
        return composable_model(model_fn, cond, uncond, inputs["weights"] * scale)
    scale = scale if setting.guided else 1.0
    return guidance.cfg_model(
        model_fn, cond, uncond if setting.guided else None, scale, rescale=setting.rescale
    )


def generate(setting: Setting, graphdefs, states, inputs: dict, scale, rng):
    """One whole generation (see module docstring); returns images (B, H, W, 3) in [0, 1] or
    the final latents. graphdefs: (denoiser, vae or None); states: {"denoiser", "vae"}."""
    den_def, vae_def = graphdefs
    get_net = _network(setting, den_def, states["denoiser"])
    vae = None if vae_def is None else nnx.merge(vae_def, states["vae"])
    ts = np.asarray(setting.ts, np.float64)  # concrete: some methods read grid values
    sched, noise = setting.schedule, inputs["noise"]
    z0 = inputs.get("z0")
    if setting.encode:
        z0 = _encode(vae, setting, inputs["image"], inputs["image_noise"])
    if setting.inpaint == "concat":
        masked = _encode(vae, setting, inputs["masked_image"], inputs["masked_image_noise"])
        inputs = {**inputs, "concat": jnp.concatenate([inputs["mask"], masked], axis=-1)}
    if setting.from_noise:
        x = setting.init_scale * noise
    else:
        t0 = jnp.float32(ts[0])
        x = sched.alpha(t0) * z0 + sched.sigma(t0) * noise
    denoise = predictions.as_denoiser(
        _guided_model(setting, get_net, inputs, scale), sched, setting.prediction_type
    )
    keep = None
    if setting.inpaint == "replace":
        keep = 1.0 - inputs["mask"]
        denoise = _replace_known(denoise, sched, float(ts[0]), z0, noise, keep)
    options = dict(setting.options)
    if "sampler_noises" in inputs:  # a stochastic method's per-step normals (its `noises`)
        options["noises"] = inputs["sampler_noises"]
    x0 = samplers.sample(
        denoise, x.astype(jnp.float32), sched, method=setting.method,
        num_steps=len(setting.ts) - 1, grid=ts, rng=rng, **options,
    )  # fmt: skip
    if keep is not None:
        x0 = keep * z0 + (1 - keep) * x0
    return x0 if setting.output == "latent" else _decode(vae, setting, x0)


generate_jit = jax.jit(generate, static_argnums=(0, 1))
