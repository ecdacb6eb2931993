"""Probability-flow ODE solvers for any schedule: Euler, Heun, midpoint, RK4.

The ODE is integrated in the variables where it is simplest (Karras et al. 2022, EDM, sec. 4):

    flow (alpha = 1 - sigma):  y = x,          s = sigma          (rectified flow, Liu et al. 2022;
                                                                    diffusers FlowMatchEuler, SD3)
    vp / ve:                   y = x / alpha,  s = sigma / alpha  (EDM; diffusers EulerDiscrete,
                                                                    HeunDiscrete, k-diffusion)

In both cases dy/ds = (y - x0_hat) / s: it is eps_hat - x0_hat (the velocity) for flow and eps_hat
for vp/ve. Stage times off the grid come from t_from_sigma_ratio (the network then sees
model_time of that t).

"euler" and "heun" are EDM Algorithm 2 (Heun) and its first-order variant: with s_churn > 0,
before each step at EDM sigma r = sigma / alpha in [s_tmin, s_tmax], the noise level is raised to
r_hat = (1 + gamma) r, gamma = min(s_churn / num_steps, sqrt(2) - 1), by adding
sqrt(r_hat^2 - r^2) * s_noise * z in x / alpha (capped at the schedule's t_max); that is
stochastic and needs rng (or `noises`). Note diffusers' EulerDiscreteScheduler evaluates the model
before adding the churn noise; we follow EDM and evaluate after.

Final step: no method evaluates the denoiser at the last grid time (sigma = 0 there by default,
where eps_hat is 0/0). "heun" takes an Euler step (EDM Algorithm 1, line 6; diffusers Heun) and
"rk4" takes Ralston's third-order step (nodes 0, 1/2, 3/4) on the last interval, whatever its end
value, so nfe is exact for every grid: euler n, heun 2n - 1, midpoint 2n, rk4 4n - 1, and the
global orders (1, 2, 2, 4) are kept.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion.samplers import base
from diffusion.samplers.base import Method, alpha_sigma, methods, scan_steps


def ode_sigma(schedule, t):
    """The integration variable s(t): sigma for flow, sigma / alpha for vp / ve."""
    if schedule.family == "flow":
        return schedule.sigma(t)
    return jnp.exp(-schedule.logsnr(t))  # sigma / alpha, exactly 0 at t = 0


def ode_time(schedule, s):
    """Inverse of ode_sigma (for stage times between grid points)."""
    if schedule.family == "flow":
        if hasattr(schedule, "t_from_sigma"):
            return schedule.t_from_sigma(s)
        return schedule.t_from_sigma_ratio(s / (1.0 - s))
    return schedule.t_from_sigma_ratio(s)


def ode_scale(schedule, t, dtype):
    """x = scale(t) * y: 1 for flow, alpha(t) for vp / ve."""
    if schedule.family == "flow":
        return jnp.ones((), dtype)
    return alpha_sigma(schedule, t, dtype)[0]


def _churn_fn(schedule, n, rng, noises, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Algorithm 2, in EDM sigma r = sigma / alpha: (y, s, t, i) -> raised (y, s, t)."""
    gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
    flow = schedule.family == "flow"
    r_max = jnp.exp(-schedule.logsnr(schedule.t_max))

    def churn(y, s, t, i):
        r = s / (1.0 - s) if flow else s
        gamma_i = jnp.where((r >= s_tmin) & (r <= s_tmax) & jnp.isfinite(r), gamma, 0.0)
        r_hat = jnp.minimum(r * (1.0 + gamma_i), r_max.astype(r.dtype))
        z = base.step_noise(rng, noises, i, y) * s_noise
        x_tilde = y * (1.0 + r) if flow else y  # x / alpha
        x_tilde = x_tilde + jnp.sqrt(jnp.maximum(r_hat**2 - r**2, 0.0)) * z
        s_hat = r_hat / (1.0 + r_hat) if flow else r_hat
        y_hat = x_tilde / (1.0 + r_hat) if flow else x_tilde
        raised = gamma_i > 0
        t_hat = jnp.where(raised, schedule.t_from_sigma_ratio(r_hat), t)
        return jnp.where(raised, y_hat, y), jnp.where(raised, s_hat, s), t_hat

    return churn


def _integrate(update, denoise_fn, x, schedule, ts, churn=None):
    """Map x to y, scan `update(f, y, s, t, s_next, t_next, last)` over the grid, map back."""
    n = ts.shape[0] - 1
    dtype = x.dtype

    def f(y, s, t):  # dy/ds = (y - x0_hat) / s
        x0_hat = denoise_fn(ode_scale(schedule, t, dtype) * y, t)
        return (y - x0_hat) / s

    def step(y, inp):
        i, t, t_next = inp
        s = jnp.asarray(ode_sigma(schedule, t), dtype)
        s_next = jnp.asarray(ode_sigma(schedule, t_next), dtype)
        if churn is not None:
            y, s, t = churn(y, s, t, i)
        return update(f, y, s, t, s_next, t_next, i == n - 1)

    y = scan_steps(step, x / ode_scale(schedule, ts[0], dtype), ts)
    return ode_scale(schedule, ts[-1], dtype) * y


def _stage(schedule, s, dtype):
    return jnp.asarray(ode_time(schedule, s), jnp.result_type(float)), s.astype(dtype)


def _euler_update(f, y, s, t, s_next, t_next, last):
    return y + (s_next - s) * f(y, s, t)


def _heun_update(f, y, s, t, s_next, t_next, last):
    h = s_next - s
    d = f(y, s, t)
    y_euler = y + h * d
    # EDM Algorithm 1: no second-order correction on the final step (there sigma_next = 0).
    return jax.lax.cond(
        last, lambda: y_euler, lambda: y + 0.5 * h * (d + f(y_euler, s_next, t_next))
    )


def _make_midpoint(schedule):
    def update(f, y, s, t, s_next, t_next, last):
        h = s_next - s
        t_mid, s_mid = _stage(schedule, s + 0.5 * h, y.dtype)
        return y + h * f(y + 0.5 * h * f(y, s, t), s_mid, t_mid)

    return update


def _make_rk4(schedule):
    def update(f, y, s, t, s_next, t_next, last):
        h = s_next - s
        k1 = f(y, s, t)
        t2, s2 = _stage(schedule, s + 0.5 * h, y.dtype)
        k2 = f(y + 0.5 * h * k1, s2, t2)
        c3 = jnp.where(last, 0.75, 0.5).astype(y.dtype)  # Ralston's 3rd-order node on the last step
        t3, s3 = _stage(schedule, s + c3 * h, y.dtype)
        k3 = f(y + c3 * h * k2, s3, t3)
        ralston = lambda: y + h * (2.0 * k1 + 3.0 * k2 + 4.0 * k3) / 9.0
        rk4 = lambda: y + h * (k1 + 2.0 * k2 + 2.0 * k3 + f(y + h * k3, s_next, t_next)) / 6.0
        return jax.lax.cond(last, ralston, rk4)

    return update


def _edm_churn(schedule, ts, rng, s_churn, s_tmin, s_tmax, s_noise, noises, x):
    """The churn function of EDM Algorithm 2, or None when s_churn = 0 (deterministic)."""
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    if s_churn == 0:
        return None
    n = ts.shape[0] - 1
    noises = base.check_noises(noises, n, x, rng, method="s_churn > 0")
    return _churn_fn(schedule, n, rng, noises, s_churn, s_tmin, s_tmax, s_noise)


def euler(
    denoise_fn, x, schedule, ts, *, rng=None, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0, noises=None,
):  # fmt: skip
    """Euler on the probability-flow ODE dy/ds = (y - x0_hat) / s (Karras et al. 2022, EDM,
    Algorithm 2 without the second-order correction; k-diffusion's sample_euler). s_churn > 0 adds
    EDM's churn noise before each step (stochastic: rng or `noises` (num_steps, *x.shape))."""
    churn = _edm_churn(schedule, ts, rng, s_churn, s_tmin, s_tmax, s_noise, noises, x)
    return _integrate(_euler_update, denoise_fn, x, schedule, ts, churn)


def heun(
    denoise_fn, x, schedule, ts, *, rng=None, s_churn: float = 0.0, s_tmin: float = 0.0,
    s_tmax: float = float("inf"), s_noise: float = 1.0, noises=None,
):  # fmt: skip
    """Heun's second-order method (Karras et al. 2022, EDM, Algorithms 1 and 2; k-diffusion's
    sample_heun): an Euler step to s_next, then the trapezoidal correction with the slope there
    (skipped on the final step, to sigma = 0). s_churn as in `euler`."""
    churn = _edm_churn(schedule, ts, rng, s_churn, s_tmin, s_tmax, s_noise, noises, x)
    return _integrate(_heun_update, denoise_fn, x, schedule, ts, churn)


def midpoint(denoise_fn, x, schedule, ts, *, rng=None):
    """Explicit midpoint rule (Runge 1895; 2 evaluations per step, midpoint in s)."""
    return _integrate(_make_midpoint(schedule), denoise_fn, x, schedule, ts)


def rk4(denoise_fn, x, schedule, ts, *, rng=None):
    """Classical 4th-order Runge-Kutta; Ralston's 3rd order on the final interval."""
    return _integrate(_make_rk4(schedule), denoise_fn, x, schedule, ts)


_EDM = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models"
METHODS = methods(
    euler=Method(euler, paper=_EDM),
    heun=Method(heun, lambda num_steps, **_: 2 * num_steps - 1, paper=_EDM),
    midpoint=Method(midpoint, lambda num_steps, **_: 2 * num_steps, paper="explicit midpoint"),
    rk4=Method(rk4, lambda num_steps, **_: 4 * num_steps - 1, paper="classical Runge-Kutta 4"),
)
