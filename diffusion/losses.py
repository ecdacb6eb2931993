"""Training objectives: noise-prediction, x0, v and flow-matching losses on any schedule.

    loss = E_{t ~ density, eps} [ w(t) || f(x_t, model_time(t), c) - target(x0, eps, t) ||^2 ]

Time densities (Esser et al. 2024, SD3, section 3.1): "uniform"; "logit_normal" (u = sigmoid(n),
n ~ N(m, s)); "mode" (mode sampling with heavy tails, scale s). For discrete DDPM schedules t is
snapped to the training table (integer timesteps), as DDPM training does.
Loss weights: "none"; "min_snr" (Hang et al. 2023: min(SNR, gamma) in x0 units, converted to the
target's units); "sigma_sqrt" and "cosmap" (SD3 / diffusers `compute_loss_weighting_for_sd3`).
Condition dropout for classifier-free guidance replaces a per-example fraction of conditions by
the null condition.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffusion import predictions
from diffusion.schedules import Schedule

TIME_DENSITIES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "min_snr", "sigma_sqrt", "cosmap")


@dataclasses.dataclass(frozen=True)
class Objective:
    schedule: Schedule
    prediction_type: str = "eps"
    time_density: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    cond_dropout: float = 0.0

    def __post_init__(self):
        predictions.canonical(self.prediction_type)
        if self.time_density not in TIME_DENSITIES:
            raise ValueError(
                f"unknown time_density {self.time_density!r}; valid: {list(TIME_DENSITIES)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; valid: {list(WEIGHTINGS)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")


def sample_u(obj: Objective, rng, batch: int):
    """u in (0, 1) from the objective's time density, (batch,)."""
    if obj.time_density == "logit_normal":
        return jax.nn.sigmoid(obj.logit_mean + obj.logit_std * jax.random.normal(rng, (batch,)))
    u = jax.random.uniform(rng, (batch,))
    if obj.time_density == "mode":
        # SD3 eq. 20: f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)
        return 1.0 - u - obj.mode_scale * (jnp.cos(jnp.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def sample_t(obj: Objective, rng, batch: int):
    """Training times in [t_min, t_max], (batch,); integer table points for discrete schedules."""
    u = sample_u(obj, rng, batch)
    s = obj.schedule
    n = getattr(s, "num_train_timesteps", None)
    if hasattr(s, "t_from_timestep"):  # discrete DDPM table: timesteps 0..N-1
        k = jnp.clip(jnp.floor(u * n), 0, n - 1)
        return s.t_from_timestep(k)
    return s.t_min + u * (s.t_max - s.t_min)


def _target_to_x0_factor(kind: str, alpha, sigma):
    """f such that ||target_hat - target||^2 = f ||x0_hat - x0||^2 at fixed x_t."""
    return {
        "x0": jnp.ones_like(alpha),
        "eps": (alpha / sigma) ** 2,
        "v": ((alpha**2 + sigma**2) / sigma) ** 2,
        "velocity": ((alpha + sigma) / sigma) ** 2,
        "score": (alpha / sigma**2) ** 2,
    }[kind]


def loss_weight(obj: Objective, t):
    """Per-example weight w(t) of the target-space squared error, (batch,)."""
    s = obj.schedule
    alpha, sigma = s.alpha(t), s.sigma(t)
    if obj.weighting == "min_snr":
        snr = (alpha / sigma) ** 2
        kind = predictions.canonical(obj.prediction_type)
        return jnp.minimum(snr, obj.min_snr_gamma) / _target_to_x0_factor(kind, alpha, sigma)
    if obj.weighting == "sigma_sqrt":
        return sigma**-2.0
    if obj.weighting == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
    return jnp.ones_like(t)


def drop_condition(rng, cond, null_cond, p: float):
    """Replace each example's condition (a pytree with batch-leading leaves) by null_cond w.p. p."""
    if p == 0.0 or cond is None:
        return cond
    batch = jax.tree.leaves(cond)[0].shape[0]
    keep = jax.random.uniform(rng, (batch,)) >= p

    def pick(c, n):
        mask = keep.reshape((batch,) + (1,) * (c.ndim - 1))
        return jnp.where(mask, c, jnp.broadcast_to(n, c.shape).astype(c.dtype))

    return jax.tree.map(pick, cond, null_cond)


def diffusion_loss(obj: Objective, model_fn, x0, rng, cond=None, null_cond=None,
                   example_weight=None):  # fmt: skip
    """Mean weighted loss and aux metrics. model_fn(x_t, model_time (B,), cond) -> prediction.
    example_weight (B,) multiplies each example's loss (e.g. DreamBooth's prior term)."""
    t_rng, e_rng, d_rng = jax.random.split(rng, 3)
    batch = x0.shape[0]
    t = sample_t(obj, t_rng, batch)  # (B,)
    eps = jax.random.normal(e_rng, x0.shape, x0.dtype)
    bshape = (batch,) + (1,) * (x0.ndim - 1)
    s = obj.schedule
    alpha = s.alpha(t).reshape(bshape).astype(x0.dtype)
    sigma = s.sigma(t).reshape(bshape).astype(x0.dtype)
    x_t = alpha * x0 + sigma * eps
    target = predictions.targets(x0, eps, t.reshape(bshape), s, obj.prediction_type)
    cond = drop_condition(d_rng, cond, null_cond, obj.cond_dropout)
    pred = model_fn(x_t, s.model_time(t), cond).astype(jnp.float32)
    per_example = jnp.mean((pred - target.astype(jnp.float32)) ** 2, axis=tuple(range(1, x0.ndim)))
    w = loss_weight(obj, t)
    if example_weight is not None:
        w = w * example_weight
    loss = jnp.mean(w * per_example)
    return loss, {"mse": jnp.mean(per_example), "t_mean": jnp.mean(t)}
