"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network function.

    pred = pred_uncond + scale * (pred_cond - pred_uncond)

evaluated as ONE batched network call per denoiser evaluation: the batch is [x, x] with
conditioning [uncond, cond] concatenated along the batch axis, as diffusers' pipelines do
(`torch.cat([latents] * 2)`, `torch.cat([negative_prompt_embeds, prompt_embeds])`). The uncond slot
takes the empty-prompt embedding, a negative-prompt embedding (negative conditioning), or a null
class label. Guidance acts on the network's own prediction space (eps, v or velocity), as in
diffusers; `cfg_denoiser` then converts the guided prediction to x0_hat for the samplers.

Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
eq. 15-16; diffusers' `rescale_noise_cfg`): the guided prediction is rescaled to the per-sample
standard deviation of the conditional one and mixed with weight `rescale` (phi).

Conditioning is any pytree of arrays with a leading batch axis of size B (the batch of x) or 1
(broadcast, e.g. one negative prompt for the whole batch): text embeddings, pooled embeddings
and class labels together, e.g. {"encoder_hidden_states": (B, L, E), "pooled": (B, P)}.
The network is called as `model_fn(x, model_time, cond)`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion import predictions
from diffusion.schedules import Schedule


def rescale_cfg(pred_cfg, pred_cond, guidance_rescale):
    """Lin et al. 2024 guidance rescale, as diffusers' `rescale_noise_cfg`.

    Standard deviations are per sample over all non-batch axes, unbiased (torch's default).
    """
    axes = tuple(range(1, pred_cond.ndim))
    std_cond = jnp.std(pred_cond, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(pred_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = pred_cfg * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * pred_cfg


def _batched_pair(cond, uncond, batch: int):
    """[uncond, cond] concatenated along the batch axis, leaves broadcast from 1 to `batch`."""
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(
            "cond and uncond must have the same pytree structure, got "
            f"{jax.tree.structure(cond)} and {jax.tree.structure(uncond)}"
        )

    def pair(path, c, u):
        c, u = jnp.asarray(c), jnp.asarray(u)
        name = jax.tree_util.keystr(path) or "cond"
        for label, leaf in (("cond", c), ("uncond", u)):
            if leaf.ndim == 0 or leaf.shape[0] not in (1, batch):
                raise ValueError(
                    f"{label}{name} has shape {leaf.shape}; its leading (batch) axis must be "
                    f"{batch} (the batch of x) or 1"
                )
        if c.shape[1:] != u.shape[1:]:
            raise ValueError(f"cond{name} shape {c.shape} and uncond{name} {u.shape} differ")
        c = jnp.broadcast_to(c, (batch, *c.shape[1:]))
        u = jnp.broadcast_to(u, (batch, *u.shape[1:]))
        return jnp.concatenate([u, c], axis=0)  # (2B, ...)

    return jax.tree_util.tree_map_with_path(pair, cond, uncond)


def cfg_model(model_fn: Callable, cond, uncond, scale, *, rescale: float = 0.0) -> Callable:
    """Guided `fn(x, model_time) -> prediction` from `model_fn(x, model_time, cond)`.

    scale: guidance weight w (a number or a traced scalar; 1 means no guidance, and when it is the
    Python number 1 only the conditional pass runs). rescale: guidance rescale phi in [0, 1].
    uncond=None also disables guidance (conditional pass only).
    """
    static_one = isinstance(scale, int | float) and scale == 1.0
    if uncond is None or static_one:

        def conditional(x, model_time):
            batch = x.shape[0]
            c = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *jnp.shape(a)[1:])), cond)
            return model_fn(x, model_time, c)

        return conditional

    def guided(x, model_time):
        batch = x.shape[0]
        pair = _batched_pair(cond, uncond, batch)
        out = model_fn(jnp.concatenate([x, x], axis=0), model_time, pair)  # (2B, ...)
        pred_uncond, pred_cond = out[:batch], out[batch:]
        pred = pred_uncond + scale * (pred_cond - pred_uncond)
        if isinstance(rescale, int | float) and rescale == 0:
            return pred
        return rescale_cfg(pred, pred_cond, rescale)

    return guided


def cfg_denoiser(
    model_fn: Callable,
    schedule: Schedule,
    prediction_type: str,
    cond,
    uncond,
    scale,
    *,
    rescale: float = 0.0,
) -> Callable:
    """`denoise_fn(x_t, t) -> x0_hat` for the samplers: guidance in the network's prediction
    space, then predictions.as_denoiser (x0_hat of the guided eps / v / velocity)."""
    guided = cfg_model(model_fn, cond, uncond, scale, rescale=rescale)
    return predictions.as_denoiser(guided, schedule, prediction_type)
