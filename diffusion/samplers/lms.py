"""Linear multistep (LMS): k-diffusion's sample_lms, diffusers' LMSDiscreteScheduler.

A variable-step Adams-Bashforth method on the probability-flow ODE in the variables of flow.py
(Karras et al. 2022, EDM: y = x / alpha, s = sigma / alpha for VP / VE; y = x, s = sigma for flow),

    dy/ds = d(y, s) = (y - x0_hat) / s,

with the derivatives of the last k = min(i + 1, order) steps interpolated by a polynomial in s and
integrated exactly over the step (Hairer, Norsett & Wanner, Solving ODEs I, sec. III.1):

    y_{i+1} = y_i + sum_j c_j d_{i-j},  c_j = int_{s_i}^{s_{i+1}} prod_{m != j} (s - s_{i-m}) /
                                                               (s_{i-j} - s_{i-m}) ds.

The Lagrange basis has degree <= 3 for order <= 4, so two-point Gauss-Legendre quadrature gives
c_j exactly (k-diffusion and diffusers use scipy's quad with epsrel 1e-4 on the same integrand).
One NFE a step; the denoiser is never evaluated at s = 0. The first steps have orders 1, 2, 3
(the Euler first step has a small error from high noise, see tests/test_linear_multistep.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion.samplers.base import Method, check_order, methods, scan_steps
from diffusion.samplers.flow import ode_scale, ode_sigma

ORDERS = (1, 2, 3, 4)


def lms_coeffs(ss, s_next, k: int):
    """c_j, j < k, for nodes ss[0] (newest, = s_i), ss[1], ... and the step s_i -> s_next."""
    mid, half = 0.5 * (ss[0] + s_next), 0.5 * (s_next - ss[0])
    nodes = (mid - half / math.sqrt(3.0), mid + half / math.sqrt(3.0))  # Gauss-Legendre, 2 pts
    out = []
    for j in range(k):
        basis = [1.0, 1.0]
        for m in range(k):
            if m != j:
                basis = [b * (tau - ss[m]) / (ss[j] - ss[m]) for b, tau in zip(basis, nodes)]
        out.append(half * (basis[0] + basis[1]))
    return out


def lms(denoise_fn, x, schedule, ts, *, rng=None, order: int = 4):
    """Linear multistep method of the given order (k-diffusion's sample_lms, default order 4 as
    diffusers' LMSDiscreteScheduler.step): one NFE a step, history of derivatives in the carry."""
    del rng
    check_order("lms", order, ORDERS)
    dtype = x.dtype

    def step(carry, inp):
        y, ds, ss = carry  # ds (order, *x.shape), ss (order,): newest first
        i, t, t_next = inp
        s, s_next = (jnp.asarray(ode_sigma(schedule, tt), dtype) for tt in (t, t_next))
        d = (y - denoise_fn(ode_scale(schedule, t, dtype) * y, t)) / s
        ds = jnp.concatenate([d[None], ds[:-1]])
        ss = jnp.concatenate([s[None], ss[:-1]])

        def update(k):
            return lambda: y + sum(c * ds[j] for j, c in enumerate(lms_coeffs(ss, s_next, k)))

        k = jnp.minimum(i + 1, order)
        return jax.lax.switch(k - 1, [update(k) for k in range(1, order + 1)]), ds, ss

    ds = jnp.zeros((order, *x.shape), dtype)  # (order, *x.shape)
    ss = jnp.arange(order, dtype=dtype) + 2.0  # distinct placeholders, never used
    y = x / ode_scale(schedule, ts[0], dtype)
    y = scan_steps(step, (y, ds, ss), ts)[0]
    return ode_scale(schedule, ts[-1], dtype) * y


METHODS = methods(
    lms=Method(
        lms, orders=ORDERS, default_grid="karras",
        paper="linear multistep (Adams-Bashforth) in EDM sigma, k-diffusion / diffusers LMS",
    ),
)  # fmt: skip
