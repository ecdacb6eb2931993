"""DDPM ancestral sampling (Ho et al. 2020), on any time grid and any schedule family.

A step from t to s < t draws x_s from the Gaussian posterior q(x_s | x_t, x_0 = x0_hat). With
alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (the
transition x_t | x_s ~ N(alpha_{t|s} x_s, sigma_{t|s}^2 I)), Bayes' rule gives (Kingma et al. 2021,
VDM appendix A; Ho et al. eq. 7 for a VP table)

    mean = alpha_s sigma_{t|s}^2 / sigma_t^2 * x0_hat + alpha_{t|s} sigma_s^2 / sigma_t^2 * x_t,
    var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2                          ("fixed_small", beta-tilde)
    var  = sigma_{t|s}^2                                                 ("fixed_large", beta_t)

For a VP table sigma_{t|s}^2 = 1 - alpha_t^2 / alpha_s^2, which is diffusers' `current_beta_t` on
skipped grids (DDPMScheduler). The formulas only assume x_t = alpha_t x_0 + sigma_t eps, so the same
code samples flow (alpha = 1 - sigma) and VE schedules; there "fixed_large" is the transition
variance sigma_{t|s}^2. No noise is added on a step to sigma_s = 0 (clean data): the last step
returns x0_hat, as diffusers does at timestep 0.

Differences from diffusers: on "trailing" grids diffusers' last timestep is > 0, and with
"fixed_large" it adds beta_t noise to the final sample; we never add noise when stepping to
sigma = 0.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion.samplers import base
from diffusion.samplers.base import Method, alpha_sigma, methods, scan_steps

VARIANCES = ("fixed_small", "fixed_large")


def posterior(x_t, x0_hat, a_t, s_t, a_s, s_s):
    """Mean, beta-tilde variance and transition variance sigma_{t|s}^2 of q(x_s | x_t, x0_hat)."""
    a_ts = a_t / a_s  # alpha_{t|s}
    var_ts = jnp.maximum(s_t**2 - a_ts**2 * s_s**2, 0.0)  # sigma_{t|s}^2
    mean = (a_s * var_ts / s_t**2) * x0_hat + (a_ts * s_s**2 / s_t**2) * x_t
    return mean, var_ts * s_s**2 / s_t**2, var_ts


def ddpm_step(x_t, x0_hat, z, a_t, s_t, a_s, s_s, variance: str):
    """One ancestral step t -> s given the denoiser output and standard normal noise z."""
    mean, var_small, var_ts = posterior(x_t, x0_hat, a_t, s_t, a_s, s_s)
    var = var_small if variance == "fixed_small" else jnp.where(s_s > 0, var_ts, 0.0)
    return mean + jnp.sqrt(var) * z


def ddpm(denoise_fn, x, schedule, ts, *, rng, variance: str = "fixed_small", noises=None):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on the grid `ts`.

    variance: "fixed_small" (posterior variance beta-tilde) or "fixed_large" (beta_t, i.e.
    1 - alpha_t^2 / alpha_s^2 on a skipped VP grid). noises: optional (num_steps, *x.shape)
    standard normals used instead of `rng` (for parity with diffusers' DDPMScheduler).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {list(VARIANCES)}")
    noises = base.check_noises(noises, ts.shape[0] - 1, x, rng, method="ddpm")

    def step(x_t, inp):
        i, t, s = inp
        a_t, s_t = alpha_sigma(schedule, t, x_t.dtype)
        a_s, s_s = alpha_sigma(schedule, s, x_t.dtype)
        x0_hat = denoise_fn(x_t, t)
        z = base.step_noise(rng, noises, i, x_t)
        return ddpm_step(x_t, x0_hat, z, a_t, s_t, a_s, s_s, variance)

    return scan_steps(step, x, ts)


METHODS = methods(
    ddpm=Method(
        ddpm,
        stochastic=True,
        paper="Ho et al. 2020, Denoising Diffusion Probabilistic Models (arXiv:2006.11239)",
    ),
)
