"""Multistep DPM-Solver, DPM-Solver++ and SDE-DPM-Solver++ (shared core), as one lax.scan.

Multistep DPM-Solver (Lu et al. 2022b, appendix B) and DPM-Solver++(2M)/(3M) (Lu et al. 2022b,
Algorithm 2 and appendix) reuse the model outputs of the previous one or two steps to form the
finite differences D1, D2, so every step costs one NFE. SDE-DPM-Solver++(2M) (Lu et al. 2022b,
sec. 5; diffusers "sde-dpmsolver++") is the same update for the reverse SDE with fresh noise.
The order rules and formulas mirror diffusers' `DPMSolverMultistepScheduler.step`:

    step i of n uses order 1 if i == 0 or the final step is "lower order", order <= 2 if i == 1 or
    it is the second-to-last step with lower_order_final and n < 15, else the requested order;
    the final step is lower order with euler_at_final, with lower_order_final and n < 15, or when it
    goes to sigma = 0 (diffusers' final_sigmas_type="zero").

Third order: diffusers (and Lu's reference code, k-diffusion) use D2 = (D1_0 - D1_1) / (r0 + r1),
which is h^2 m''/2, with the coefficient -alpha_t phi_3 that belongs to h^2 m'' (the singlestep
D2). The h^3 term is then half its Taylor value, a local error O(h^3): that 3M is globally second
order (measured on the exact Gaussian, tests/test_dpm_solver_pp.py). third_order="taylor" doubles
D2 and gives a true third-order multistep method; "diffusers" (default) keeps parity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers.base import check_order, scan_steps
from diffusion.samplers.dpm_solver_single import check_options, coeffs, model_output, point

THIRD_ORDER = ("diffusers", "taylor")


def multistep_orders(num_steps: int, order: int, lower_order_final: bool, euler_at_final: bool):
    """Static per-step orders of `DPMSolverMultistepScheduler.step` (grid end not yet known)."""
    n, out = num_steps, []
    for i in range(n):
        final = i == n - 1 and (euler_at_final or (lower_order_final and n < 15))
        second = i == n - 2 and lower_order_final and n < 15
        if order == 1 or i < 1 or final:
            out.append(1)
        elif order == 2 or i < 2 or second:
            out.append(2)
        else:
            out.append(3)
    return np.asarray(out, np.int32)


def multistep_update(c, solver_type, order, x, ms, lams, lam_t, z, third_order="diffusers"):
    """One multistep update from the newest point to t with step coefficients c = coeffs(s0, t).

    ms[j] is the model output at lambda = lams[j] (j = 0 newest, then one and two steps back).
    """
    x_t = c.c_x * x + c.c0 * ms[0] + c.c_z * z
    if order == 1:
        return x_t
    h = lam_t - lams[0]
    r0 = (lams[0] - lams[1]) / h
    d1_0 = (ms[0] - ms[1]) / r0
    if order == 2:
        return x_t + (c.c1_mid if solver_type == "midpoint" else c.c1_heun) * d1_0
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (ms[1] - ms[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1) * (2.0 if third_order == "taylor" else 1.0)
    return x_t + c.c1_heun * d1 + c.c2 * d2


def step_noise(rng, noises, i, x):
    """Standard normal noise of step i: noises[i] if given, else drawn from fold_in(rng, i)."""
    if noises is not None:
        return jnp.asarray(noises, x.dtype)[i]
    return jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)


def run_multistep(
    denoise_fn,
    x,
    schedule,
    ts,
    *,
    algorithm,
    order,
    solver_type,
    lower_order_final,
    euler_at_final,
    third_order="diffusers",
    rng=None,
    noises=None,
):
    """Multistep solver over grid ts; history (model outputs, lambdas) lives in the scan carry."""
    if third_order not in THIRD_ORDER:
        raise ValueError(f"unknown third_order {third_order!r}; valid: {THIRD_ORDER}")
    n = ts.shape[0] - 1
    if algorithm == "sde-dpmsolver++":
        if noises is None and rng is None:
            raise ValueError("sde-dpmsolver++ needs rng (or noises)")
        if noises is not None and tuple(np.shape(noises)) != (n, *x.shape):
            raise ValueError(f"noises has shape {np.shape(noises)}, expected {(n, *x.shape)}")
    static = multistep_orders(n, order, lower_order_final, euler_at_final)
    orders = jnp.where(ts[1:] == 0, 1, jnp.asarray(static))  # (n,) sigma = 0 end: first order
    dtype = x.dtype

    def step(carry, inp):
        x, m1, m2, lam1, lam2 = carry  # model outputs and lambdas of the previous two steps
        i, t_s, t_t = inp
        s0, t = point(schedule, t_s, dtype), point(schedule, t_t, dtype)
        c = coeffs(algorithm, s0, t)
        m0 = model_output(denoise_fn, x, t_s, s0, algorithm)
        ms, lams = [m0, m1, m2], [s0.lam, lam1, lam2]
        z = step_noise(rng, noises, i, x) if algorithm == "sde-dpmsolver++" else jnp.zeros_like(x)
        branches = [
            lambda k=k: multistep_update(c, solver_type, k, x, ms, lams, t.lam, z, third_order)
            for k in range(1, order + 1)
        ]
        x_next = jax.lax.switch(orders[i] - 1, branches)
        return x_next, m0, m1, s0.lam, lam1

    zeros = jnp.zeros_like(x)
    # Placeholder history lambdas (never used at order 1) must be finite.
    lam_T = point(schedule, ts[0], dtype).lam
    carry = (x, zeros, zeros, lam_T, lam_T)
    return scan_steps(step, carry, ts)[0]


def multistep_runner(method: str, algorithm: str, doc: str):
    """The `run` of a multistep method with diffusers' order rules (`order` 1-3; third_order:
    "diffusers" for parity, globally second order, or "taylor", a true third order)."""

    def run(
        denoise_fn,
        x,
        schedule,
        ts,
        *,
        rng=None,
        order: int = 2,
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        third_order: str = "diffusers",
    ):
        del rng
        check_order(method, order, (1, 2, 3))
        check_options(method, solver_type)
        return run_multistep(
            denoise_fn, x, schedule, ts, algorithm=algorithm, order=order,
            solver_type=solver_type, lower_order_final=lower_order_final,
            euler_at_final=euler_at_final, third_order=third_order,
        )  # fmt: skip

    run.__doc__ = doc
    return run
