"""UniPC: multistep predictor (UniP) + corrector (UniC) in data prediction.

Zhao, Bai, Rao, Zhou, Lu (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", NeurIPS 2023, arXiv:2302.04867 (Algorithms 1-3, the B(h) variants
of Appendix D). The rules mirror diffusers' `UniPCMultistepScheduler` with `predict_x0=True`,
`disable_corrector=[]`, `solver_p=None`:

  step i (t_i -> t_{i+1}), with x_i the predictor output and x0_hat_i = D(x_i, t_i):
    1. (i > 0) UniC-p corrects x_i with the new model output x0_hat_i, p = the predictor order
       used to reach t_i; the corrected x_i^c is the base of the next step (the network is not
       re-evaluated at x_i^c, so nfe = num_steps).
    2. UniP-q predicts x_{i+1} from x_i^c and the last q outputs, q = min(order, i + 1,
       N - i if lower_order_final). The final x_N is never corrected.

In paper notation, with lambda = log(alpha / sigma), h = lambda_t - lambda_s0, r_k = (lambda_sk -
lambda_s0) / h, D_k = (x0_hat_sk - x0_hat_s0) / r_k, and B(h) = h (bh1) or e^h - 1 (bh2) for the
data-prediction step size hh = -h:

    x_t = sigma_t / sigma_s0 x_s0 - alpha_t (e^{hh} - 1) x0_hat_s0
          - alpha_t B(h) sum_k rho_k D_k,

rho solving R rho = b with R_ik = r_k^(i-1), b_i = hh phi_{i+1}(hh) i! / B(h) (phi the exponential
integrator functions), and rho = 1/2 for UniP-2 / UniC-1 as diffusers.

A step to sigma = 0 (lambda = +inf) always uses order 1 and returns x0_hat exactly, the limit of
the update (diffusers produces NaN there for bh1, and inf with lower_order_final=False). A start
at alpha = 0 (lambda = -inf, flow at t = 1) uses lambda = log(1e-6), as diffusers' flow sigmas do.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from diffusion.samplers.base import Method, alpha_sigma, check_order, methods, scan_steps

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")
LAMBDA_MIN = math.log(1e-6)  # ~ -13.8, below the first lambda of every VP / VE schedule here


def _b_coeffs(h, order: int, variant: str):
    """(e^{hh} - 1, B(h), b) for data prediction hh = -h; b (order,) as diffusers' recurrence."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)  # hh phi_1(hh) = e^{hh} - 1
    B_h = hh if variant == "bh1" else jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0  # phi_2(hh) * hh ... as the recurrence in diffusers
    b, factorial_i = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i
    return h_phi_1, B_h, jnp.stack(b)


def _uni_bh(x, x0_hist, lam_hist, lam_t, alpha_t, sigma_t, sigma_s0, *, order, variant, x0_t):
    """One UniP-order (x0_t None) or UniC-order (x0_t = x0_hat at the target) B(h) update.

    x0_hist (K, *x.shape) / lam_hist (K,) hold past x0_hat / lambda, newest last (= s0). The
    target is lambda_t; the base sample x sits at s0.
    """
    x0_s0, lam_s0 = x0_hist[-1], lam_hist[-1]
    h = lam_t - lam_s0
    h_phi_1, B_h, b = _b_coeffs(h, order, variant)
    x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * x0_s0
    n_hist = order - 1  # previous outputs used besides s0
    r = [(lam_hist[-(k + 1)] - lam_s0) / h for k in range(1, n_hist + 1)]
    D = [(x0_hist[-(k + 1)] - x0_s0) / r_k for k, r_k in zip(range(1, n_hist + 1), r)]
    R = jnp.stack([jnp.stack(r + [jnp.ones_like(h)]) ** (i - 1) for i in range(1, order + 1)])
    if x0_t is None:  # predictor UniP-order
        if order == 1:
            return x_t.astype(x.dtype)  # no correction term: keeps the h = inf step finite
        rho = jnp.full((1,), 0.5, x.dtype) if order == 2 else jnp.linalg.solve(R[:-1, :-1], b[:-1])
        res = sum(rho[k] * D[k] for k in range(n_hist))
    else:  # corrector UniC-order, adds the new output x0_t with weight rho[-1]
        rho = jnp.full((1,), 0.5, x.dtype) if order == 1 else jnp.linalg.solve(R, b)
        res = sum(rho[k] * D[k] for k in range(n_hist)) + rho[-1] * (x0_t - x0_s0)
    return (x_t - alpha_t * B_h * res).astype(x.dtype)


def unipc(
    denoise_fn,
    x,
    schedule,
    ts,
    *,
    rng=None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
):
    """UniPC multistep sampler (Zhao et al. 2023), data prediction, diffusers' rules.

    order: predictor order p in 1..3 (the corrector UniC-p raises it by one); variant: "bh1" |
    "bh2" (B(h) = h or e^h - 1); lower_order_final: q <= N - i in the last steps as diffusers.
    """
    del rng  # deterministic
    check_order("unipc", order, ORDERS)
    if variant not in VARIANTS:
        raise ValueError(f"unipc variant must be one of {VARIANTS}, got {variant!r}")
    n = ts.shape[0] - 1
    alphas, sigmas = alpha_sigma(schedule, ts, x.dtype)  # (n + 1,) each
    # alpha = 0 (flow at t = 1) gives lambda = -inf and an infinite h; floor it where diffusers'
    # use_flow_sigmas starts (sigma = 1 - 1e-6), keeping every coefficient finite.
    lams = jnp.maximum(schedule.logsnr(ts), LAMBDA_MIN)
    upd = functools.partial(_uni_bh, variant=variant)
    # Branch j of the switch: corrector of order j (0 = none) / predictor of order j + 1.
    correctors = [lambda a: a[0]] + [
        (lambda a, p=p: upd(*a[:-1], order=p, x0_t=a[-1])) for p in range(1, order + 1)
    ]
    predictors = [(lambda a, p=p: upd(*a, order=p, x0_t=None)) for p in range(1, order + 1)]

    def step(carry, inp):
        x_i, x_prev, x0_hist, lam_hist, prev_order = carry
        i, t_cur, _ = inp
        x0_i = denoise_fn(x_i, t_cur).astype(x_i.dtype)
        a_i, s_i, lam_i = alphas[i], sigmas[i], lams[i]
        # UniC with the order of the predictor that produced x_i (skipped at i = 0).
        args = (x_prev, x0_hist, lam_hist, lam_i, a_i, s_i, sigmas[jnp.maximum(i - 1, 0)], x0_i)
        x_c = jax.lax.switch(jnp.where(i > 0, prev_order, 0), correctors, args)
        x0_hist = jnp.concatenate([x0_hist[1:], x0_i[None]])  # (order, *x.shape), newest last
        lam_hist = jnp.concatenate([lam_hist[1:], lam_i[None]])
        q = jnp.minimum(order, i + 1)
        if lower_order_final:
            q = jnp.minimum(q, n - i)
        q = jnp.where(sigmas[i + 1] == 0, 1, q).astype(jnp.int32)  # to clean data: x0_hat
        args = (x_c, x0_hist, lam_hist, lams[i + 1], alphas[i + 1], sigmas[i + 1], s_i)
        x_next = jax.lax.switch(q - 1, predictors, args)
        return x_next, x_c, x0_hist, lam_hist, q

    x0_hist = jnp.zeros((order, *x.shape), x.dtype)  # (order, *x.shape)
    # Distinct finite placeholder lambdas: unused slots never divide by zero.
    lam_hist = jnp.arange(order, dtype=lams.dtype) - order
    # x_prev = x makes corrector branch 0 (i = 0, nothing to correct) return x_0 = x unchanged.
    carry = (x, x, x0_hist, lam_hist, jnp.asarray(1, jnp.int32))
    return scan_steps(step, carry, ts)[0]


METHODS = methods(
    unipc=Method(unipc, orders=ORDERS, paper="Zhao et al. 2023, UniPC (arXiv:2302.04867)"),
)
