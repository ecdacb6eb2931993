"""PNDM and PLMS: pseudo numerical methods (Liu, Ren, Lin, Zhao 2022, ICLR, arXiv:2202.09778).

The "pseudo" method keeps DDIM's transfer (eq. 9, "phi") and replaces the noise estimate by a
Runge-Kutta (PRK) or linear-multistep (PLMS) combination of eps_hat = (x - alpha x0_hat) / sigma:

    phi(x_s, e, s -> t) = alpha_t (x_s - sigma_s e) / alpha_s + sigma_t e      (DDIM, eq. 9)
    PLMS (eq. 12): e' = (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24, x_{i+1} = phi(x_i, e')
    PRK (eq. 13):  e1 = eps(x, t), e2 = eps(phi(x, e1, t -> m), m), e3 = eps(phi(x, e2, t -> m), m),
                   e4 = eps(phi(x, e3, t -> t'), t'), e' = (e1 + 2 e2 + 2 e3 + e4) / 6,
                   m = (t + t') / 2.

In phi's variables (y = x / alpha, rho = sigma / alpha) phi is y + (rho_t - rho_s) e, so PLMS is
Adams-Bashforth-4 in rho with constant coefficients: fourth order on grids uniform in rho.
`pndm`: 3 PRK warm-up steps (4 NFE each), then PLMS with the e_i of every step start (diffusers'
PNDMScheduler, skip_prk_steps=False). `plms`: the warm-up of diffusers' skip_prk_steps=True (the
sampler of the original Stable Diffusion): a first step e' = (e_0 + eps(phi(x, e_0), t_1)) / 2
(2 NFE), then AB2, AB3, AB4 with constant coefficients. Warm-up steps are never the last step (it
would evaluate eps at sigma = 0): NFE n + 3 min(3, n - 1) (pndm), n + min(1, n - 1) (plms),
diffusers' counts for n >= 4. The grid must start where alpha > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.samplers.base import Method, alpha_sigma, methods, scan_steps

AB = {  # Adams-Bashforth coefficients, newest first (PNDM eq. 12 and its lower orders)
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


def _run(denoise_fn, x, schedule, ts, warmup: str):
    n = ts.shape[0] - 1
    n_warm = min(3 if warmup == "prk" else 1, n - 1)
    dtype = x.dtype

    def eps(x, t):
        a, s = alpha_sigma(schedule, t, dtype)
        return (x - a * denoise_fn(x, t)) / s

    def phi(x, e, t_s, t_t):  # DDIM transfer, PNDM eq. 9
        (a_s, s_s), (a_t, s_t) = (
            alpha_sigma(schedule, t_s, dtype),
            alpha_sigma(schedule, t_t, dtype),
        )
        return a_t * (x - s_s * e) / a_s + s_t * e

    def prk(x, e1, t, t_next):
        m = 0.5 * (t + t_next)
        e2 = eps(phi(x, e1, t, m), m)
        e3 = eps(phi(x, e2, t, m), m)
        e4 = eps(phi(x, e3, t, t_next), t_next)
        return (e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0

    def heun(x, e0, t, t_next):
        return 0.5 * (e0 + eps(phi(x, e0, t, t_next), t_next))

    def step(carry, inp):
        x, hist = carry  # hist (3, *x.shape): e of the previous three step starts, newest first
        i, t, t_next = inp
        e0 = eps(x, t)
        es = [e0, hist[0], hist[1], hist[2]]
        ab = [lambda q=q: sum(c * e for c, e in zip(AB[q], es)) for q in (1, 2, 3, 4)]
        warm = prk if warmup == "prk" else heun
        e = jax.lax.cond(
            i < n_warm,
            lambda: warm(x, e0, t, t_next),
            lambda: jax.lax.switch(jnp.minimum(i, 3), ab),
        )
        return phi(x, e, t, t_next), jnp.concatenate([e0[None], hist[:-1]])

    hist = jnp.zeros((3, *x.shape), dtype)  # (3, *x.shape)
    return scan_steps(step, (x, hist), ts)[0]


def pndm(denoise_fn, x, schedule, ts, *, rng=None):
    """PNDM (Liu et al. 2022, Algorithm 2): 3 pseudo Runge-Kutta (PRK, eq. 13) warm-up steps, then
    pseudo linear multistep (PLMS, eq. 12); diffusers' PNDMScheduler(skip_prk_steps=False)."""
    del rng
    return _run(denoise_fn, x, schedule, ts, "prk")


def plms(denoise_fn, x, schedule, ts, *, rng=None):
    """PLMS (Liu et al. 2022, eq. 12) with diffusers' PNDMScheduler(skip_prk_steps=True) warm-up:
    a pseudo-Heun first step, then AB2, AB3 and AB4 on eps_hat through the DDIM transfer."""
    del rng
    return _run(denoise_fn, x, schedule, ts, "heun")


_PNDM = "Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models (arXiv:2202.09778)"
METHODS = methods(
    pndm=Method(pndm, lambda num_steps, **_: num_steps + 3 * min(3, num_steps - 1), paper=_PNDM),
    plms=Method(plms, lambda num_steps, **_: num_steps + min(1, num_steps - 1), paper=_PNDM),
)
