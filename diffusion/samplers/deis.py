"""DEIS: diffusion exponential integrator sampler (Zhang & Chen 2023, ICLR, arXiv:2204.13902).

In rho = sigma / alpha and y = x / alpha the probability-flow ODE is dy/drho = eps_hat (eq. 9-10
with the exponential integrator absorbed), so a step from s0 to t is exact up to the integral of
eps_hat over rho. "logrho" DEIS (the paper's polynomial extrapolation in log rho, sec. 4, as
diffusers' DEISMultistepScheduler(algorithm_type="deis", solver_type="logrho")) interpolates the
eps_hat of the last k steps by a Lagrange polynomial in log rho and integrates it exactly:

    y_t = y_s0 + sum_j c_j eps_j,  c_j = int_{rho_s0}^{rho_t} prod_{m != j} (log r - log rho_m) /
                                                                (log rho_j - log rho_m) dr,

with the antiderivatives in closed form (diffusers' `ind_fn`). Order 1 is DDIM; the multistep
loop and its order rules (first steps, lower_order_final) are dpm_multistep.run_multistep's, with
this update; the step to sigma = 0 (log rho = -inf) is first order.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion.samplers.base import Method, Point, methods
from diffusion.samplers.dpm_multistep import run_multistep

ORDERS = (1, 2, 3)


def _antiderivative(r, log_b, log_others):
    """F(r) = int prod_m (log r - log c_m) / (log b - log c_m) dr for one or two c_m."""
    log_r = jnp.log(r)
    if len(log_others) == 1:  # int (log r - c) dr = r (log r - c - 1)
        (c,) = log_others
        return r * (log_r - c - 1.0) / (log_b - c)
    # int (log r - c)(log r - d) dr = r ((log r - c)(log r - d) - (2 log r - c - d) + 2)
    c, d = log_others
    poly = (log_r - c) * (log_r - d) - (2.0 * log_r - c - d) + 2.0
    return r * poly / ((log_b - c) * (log_b - d))


def deis_update(c, order, x, ms, lams, t: Point, z):
    """One DEIS-logrho step from the newest point (lams[0], log rho = -lambda) to t.

    c = dpm_multistep.coeffs("dpmsolver", s0, t): c.c_x = alpha_t / alpha_s0, and order 1 is the
    DPM-Solver-1 (DDIM) update c_x x + c0 eps_0 (finite at sigma_t = 0).
    """
    del z
    if order == 1:
        return c.c_x * x + c.c0 * ms[0]
    log_rho = [-lam for lam in lams[:order]]  # log rho of the nodes, newest first
    rho_t, rho_0 = jnp.exp(-t.lam), jnp.exp(-lams[0])
    x_t = c.c_x * x
    for j in range(order):
        others = [log_rho[m] for m in range(order) if m != j]
        c_j = _antiderivative(rho_t, log_rho[j], others) - _antiderivative(
            rho_0, log_rho[j], others
        )
        x_t = x_t + t.alpha * c_j * ms[j]
    return x_t


def deis(denoise_fn, x, schedule, ts, *, rng=None, order: int = 3, lower_order_final: bool = True):
    """Multistep DEIS-logrho of order 1-3 (Zhang & Chen 2023, arXiv:2204.13902, sec. 4; diffusers'
    DEISMultistepScheduler, solver_order default 3): eps_hat of the last `order` steps extrapolated
    in log(sigma / alpha), one NFE a step."""
    del rng
    return run_multistep(
        "deis", denoise_fn, x, schedule, ts, algorithm="dpmsolver", order=order,
        lower_order_final=lower_order_final, euler_at_final=False, update=deis_update,
    )  # fmt: skip


METHODS = methods(
    deis=Method(
        deis, orders=ORDERS,
        paper="Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator "
        "(DEIS, arXiv:2204.13902)",
    ),
)  # fmt: skip
