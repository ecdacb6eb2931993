"""DDIM (Song et al. 2021, eq. 12), deterministic (eta = 0) or stochastic (eta > 0).

With eps_hat = (x_t - alpha_t x0_hat) / sigma_t, the step from t to s < t is

    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,    z ~ N(0, I),
    c = eta sigma_s / sigma_t sigma_{t|s},  sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2

which is Song et al.'s sigma_t(eta) (eq. 16) written for any x_t = alpha_t x_0 + sigma_t eps, so it
works for VP, flow and VE schedules. eta = 1 is DDPM's "fixed_small" posterior; eta = 0 is the
first-order exponential integrator of the probability-flow ODE (DPM-Solver-1, Lu et al. 2022).
A step to sigma_s = 0 returns x0_hat. Matches diffusers' DDIMScheduler (clip_sample=False) on its
leading/trailing grids; set_alpha_to_one=False means the grid ends at t_min (timestep 0) instead
of 0: pass that grid explicitly. diffusers' "linspace" DDIM spacing is not a grid (it steps from
timestep k to k - N // num_steps, which is not the next timestep), so it has no equivalent here.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion.samplers import base
from diffusion.samplers.base import Method, alpha_sigma, methods, scan_steps


def ddim_step(x_t, x0_hat, z, a_t, s_t, a_s, s_s, eta):
    """One DDIM step t -> s; z is ignored when eta is the Python number 0."""
    eps_hat = (x_t - a_t * x0_hat) / s_t
    if isinstance(eta, int | float) and eta == 0:
        return a_s * x0_hat + s_s * eps_hat
    a_ts = a_t / a_s  # alpha_{t|s}
    var_ts = jnp.maximum(s_t**2 - a_ts**2 * s_s**2, 0.0)  # sigma_{t|s}^2
    c = eta * s_s / s_t * jnp.sqrt(var_ts)
    return a_s * x0_hat + jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0)) * eps_hat + c * z


def ddim(denoise_fn, x, schedule, ts, *, rng, eta: float = 0.0, noises=None):
    """DDIM sampling on the grid `ts` (Song et al. 2021, eq. 12).

    eta: 0 for the deterministic sampler, > 0 adds fresh noise (needs rng, or `noises` of shape
    (num_steps, *x.shape) as diffusers' `variance_noise`).
    """
    deterministic = isinstance(eta, int | float) and eta == 0
    if isinstance(eta, int | float) and eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    stochastic = None if deterministic else "ddim with eta > 0"
    noises = base.check_noises(noises, ts.shape[0] - 1, x, rng, method=stochastic)

    def step(x_t, inp):
        i, t, s = inp
        a_t, s_t = alpha_sigma(schedule, t, x_t.dtype)
        a_s, s_s = alpha_sigma(schedule, s, x_t.dtype)
        x0_hat = denoise_fn(x_t, t)
        z = None if deterministic else base.step_noise(rng, noises, i, x_t)
        return ddim_step(x_t, x0_hat, z, a_t, s_t, a_s, s_s, eta)

    return scan_steps(step, x, ts)


METHODS = methods(
    ddim=Method(
        ddim,
        stochastic=False,  # only with eta > 0; ddim() then asks for rng
        paper="Song et al. 2021, Denoising Diffusion Implicit Models (arXiv:2010.02502)",
    ),
)
