"""Ancestral and stochastic singlestep samplers from k-diffusion (Crowson): euler_ancestral,
dpmpp_2s_ancestral, dpmpp_sde ("Euler a", "DPM++ 2S a", "DPM++ SDE" in WebUIs).

k-diffusion works in the variables of Karras et al. 2022 (EDM): y = x / alpha_t and the noise
level r = sigma_t / alpha_t (x and sigma themselves for VE schedules), lambda = -log r. An
ancestral step from r to r_next splits into a deterministic step down to r_down and fresh noise
of standard deviation r_up (k-diffusion's `get_ancestral_step`):

    r_up = min(r_next, eta r_next sqrt(1 - r_next^2 / r^2)),  r_down = sqrt(r_next^2 - r_up^2),

so y at r_next has the marginal noise level r_next (eta = 1: the DDPM posterior's noise). We step
in x (not y), so that a grid may start at alpha = 0 (flow at t = 1): the deterministic move is a
DPM-Solver++ update to the "down point" (alpha_next, alpha_next r_down, lambda_down), a virtual
point with the alpha of t_next and the noise level r_down, and the noise term is
alpha_next r_up z. Its coefficients are dpm_multistep.coeffs. On the step to r_next = 0 (the last
of the default grids) nothing is added and the result is x0_hat, as k-diffusion's Euler step.

euler_ancestral with eta <= 1 is DDIM (Song et al. 2021, eq. 12) with the same eta: both step to
x0_hat + r_down eps_hat and add r_up z.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.samplers import base
from diffusion.samplers.base import Method, Point, methods, point, scan_steps
from diffusion.samplers.dpm_multistep import coeffs

_K = "k-diffusion (Crowson), ancestral sampling (Ho et al. 2020) with "


def ancestral_split(p: Point, p_next: Point, eta: float):
    """(down point, alpha_next r_up): k-diffusion's get_ancestral_step in r = sigma / alpha."""
    r_over = jnp.exp(p.lam - p_next.lam)  # r_next / r, 0 where r = inf (alpha = 0)
    r_next = p_next.sigma / p_next.alpha
    r_up = jnp.minimum(r_next, eta * r_next * jnp.sqrt(1.0 - r_over**2))
    r_down = jnp.sqrt(jnp.maximum(r_next**2 - r_up**2, 0.0))
    down = Point(p_next.alpha, p_next.alpha * r_down, -jnp.log(r_down))
    return down, p_next.alpha * r_up


def _check(method, eta, s_noise, noises, n, x, rng, per_step=None):
    if not isinstance(eta, int | float) or eta < 0:
        raise ValueError(f"{method}: eta must be a number >= 0, got {eta!r}")
    stochastic = method if eta > 0 and s_noise != 0 else None
    return base.check_noises(noises, n, x, rng, method=stochastic, per_step=per_step)


def _ancestral(method, denoise_fn, x, schedule, ts, rng, noises, eta, s_noise, second_order):
    """Scan of ancestral steps: D (x0_hat, or the 2S midpoint estimate) to the down point, then
    noise s_noise alpha_next r_up z."""
    noises = _check(method, eta, s_noise, noises, ts.shape[0] - 1, x, rng)
    dtype = x.dtype

    def step(x, inp):
        i, t, t_next = inp
        p, p_next = point(schedule, t, dtype), point(schedule, t_next, dtype)
        down, noise_std = ancestral_split(p, p_next, eta)
        x0_hat = denoise_fn(x, t)

        def midpoint_estimate():  # DPM-Solver++(2S), r = 1/2: x0_hat at lambda + h/2
            t_s = schedule.t_from_logsnr(0.5 * (p.lam + down.lam)).astype(t.dtype)
            p_s = point(schedule, t_s, dtype)
            c_s = coeffs("dpmsolver++", p, p_s)
            return denoise_fn(c_s.c_x * x + c_s.c0 * x0_hat, t_s)

        d = x0_hat
        if second_order:  # first order on the step to sigma = 0: x0_hat, no wasted NFE
            d = jax.lax.cond(p_next.sigma == 0, lambda: x0_hat, midpoint_estimate)
        c = coeffs("dpmsolver++", p, down)
        x = c.c_x * x + c.c0 * d
        if eta == 0 or s_noise == 0:
            return x
        return x + s_noise * noise_std * base.step_noise(rng, noises, i, x)

    return scan_steps(step, x, ts)


def euler_ancestral(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, eta: float = 1.0, s_noise: float = 1.0
):  # fmt: skip
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral; diffusers'
    EulerAncestralDiscreteScheduler, eta = 1): per step, D = x0_hat(x, t),

        y_down = y + (r_down - r) (y - D) / r,   y_next = y_down + s_noise r_up z.

    noises: None (z from fold_in(rng, i)) or (num_steps, *x.shape) normals.
    """
    args = (rng, noises, eta, s_noise, False)
    return _ancestral("euler_ancestral", denoise_fn, x, schedule, ts, *args)


def dpmpp_2s_ancestral(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, eta: float = 1.0, s_noise: float = 1.0
):  # fmt: skip
    """Ancestral sampling with DPM-Solver++(2S) steps (k-diffusion's sample_dpmpp_2s_ancestral;
    Lu et al. 2022b, arXiv:2211.01095, Algorithm 1 with r = 1/2): per step, with h = lambda_down -
    lambda and s at lambda + h/2,

        u = sigma_s/sigma x + alpha_s (1 - e^{-h/2}) D,   D_2 = x0_hat(u, s)
        x_down = sigma_down/sigma x + alpha_next (1 - e^{-h}) D_2,   then + s_noise alpha r_up z.

    2 NFE a step; the step to sigma = 0 is first order (1 NFE, returns x0_hat).
    """
    args = (rng, noises, eta, s_noise, True)
    return _ancestral("dpmpp_2s_ancestral", denoise_fn, x, schedule, ts, *args)


def brownian_pair(p: Point, p_s: Point, p_next: Point, n):
    """Two normalised Brownian increments over [r, r_s] and [r, r_next] in the time r (as
    k-diffusion's BrownianTreeNoiseSampler with its default identity transform): z1 = n[0],
    z2 = (sqrt(r - r_s) n[0] + sqrt(r_s - r_next) n[1]) / sqrt(r - r_next), n (2, ...) i.i.d."""
    r, r_s, r_next = (jnp.exp(-q.lam) for q in (p, p_s, p_next))
    w1 = jnp.sqrt((1.0 - r_s / r) / (1.0 - r_next / r))  # finite at r = inf
    w2 = jnp.sqrt((r_s - r_next) / (r - r_next))
    return n[0], w1 * n[0] + w2 * n[1]


def dpmpp_sde(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, eta: float = 1.0, s_noise: float = 1.0,
    r: float = 0.5,
):  # fmt: skip
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde; diffusers' DPMSolverSDEScheduler; the
    singlestep DPM-Solver++(2S) of Lu et al. 2022b with an ancestral split on both stages): per
    step, s at lambda + r h (h = lambda_next - lambda),

        u = DPM-Solver++(1) from t to the down point of (t, s) + s_noise alpha_s r_up z1
        D_2 = x0_hat(u, s),   D' = (1 - 1/(2r)) D + 1/(2r) D_2
        x_next = DPM-Solver++(1) with D' to the down point of (t, t_next) + s_noise alpha r_up z2

    z1, z2 are the two Brownian increments k-diffusion draws from one Brownian tree (brownian_pair).
    noises: None (drawn from fold_in(rng, i)) or (num_steps, 2, *x.shape) = k-diffusion's
    noise_sampler outputs (z1, z2) per step. 2 NFE a step; the step to sigma = 0 is first order.
    """
    noises = _check("dpmpp_sde", eta, s_noise, noises, ts.shape[0] - 1, x, rng, per_step=2)
    if not 0 < r <= 1:
        raise ValueError(f"dpmpp_sde: r must be in (0, 1], got {r}")
    dtype = x.dtype

    def step(x, inp):
        i, t, t_next = inp
        p, p_next = point(schedule, t, dtype), point(schedule, t_next, dtype)
        x0_hat = denoise_fn(x, t)

        def sde_step():
            t_s = schedule.t_from_logsnr(p.lam + r * (p_next.lam - p.lam)).astype(t.dtype)
            p_s = point(schedule, t_s, dtype)
            z1, z2 = jnp.zeros_like(x), jnp.zeros_like(x)
            if eta > 0 and s_noise != 0:
                z = base.step_noise(rng, noises, i, x, per_step=2)  # (2, *x.shape)
                z1, z2 = (z[0], z[1]) if noises is not None else brownian_pair(p, p_s, p_next, z)
            down_s, std_s = ancestral_split(p, p_s, eta)
            c = coeffs("dpmsolver++", p, down_s)
            u = c.c_x * x + c.c0 * x0_hat + s_noise * std_s * z1
            d = (1.0 - 0.5 / r) * x0_hat + 0.5 / r * denoise_fn(u, t_s)
            down, std = ancestral_split(p, p_next, eta)
            c = coeffs("dpmsolver++", p, down)
            return c.c_x * x + c.c0 * d + s_noise * std * z2

        return jax.lax.cond(p_next.sigma == 0, lambda: x0_hat, sde_step)

    return scan_steps(step, x, ts)


def _two_per_step(num_steps, ends_at_zero=True, **_):
    """2 NFE a step, 1 on a step to t = 0."""
    return 2 * num_steps - int(ends_at_zero)


METHODS = methods(
    euler_ancestral=Method(
        euler_ancestral, stochastic=True, default_grid="karras", paper=_K + "Euler steps"
    ),
    dpmpp_2s_ancestral=Method(
        dpmpp_2s_ancestral, _two_per_step, stochastic=True, default_grid="karras",
        paper=_K + "DPM-Solver++(2S) steps (Lu et al. 2022b, arXiv:2211.01095)",
        data_prediction=True,
    ),
    dpmpp_sde=Method(
        dpmpp_sde, _two_per_step, stochastic=True, default_grid="karras",
        paper="k-diffusion's DPM-Solver++ SDE (Lu et al. 2022b, arXiv:2211.01095)",
        data_prediction=True,
    ),
)  # fmt: skip
