"""Multistep DPM-Solver, DPM-Solver++ and SDE-DPM-Solver++; the DPM step coefficients.

With lambda = log(alpha / sigma) and h = lambda_t - lambda_s, the exact solution of the diffusion
ODE from s to t is (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 9)

    noise prediction (DPM-Solver):  x_t = a_t/a_s x_s - a_t int e^{-lambda} eps_hat dlambda
    data prediction (DPM-Solver++): x_t = s_t/s_s x_s + s_t int e^{lambda} x0_hat dlambda

(a = alpha, s = sigma) and a k-th order solver Taylor-expands the model output m (eps_hat or
x0_hat) in lambda: x_t = c_x x_s + c0 D0 + c1 D1 + c2 D2 with D0 = m, D1 ~ h m', D2 ~ h^2 m''/2.
The coefficients (`coeffs`, shared with dpm_singlestep.py) are diffusers'
(`DPMSolverMultistepScheduler` / `DPMSolverSinglestepScheduler`), written with expm1 for accuracy
at small h; "midpoint" and "heun" solver types differ in the D1 coefficient of second-order
updates. eta > 0 gives the SDE solvers (SDE-DPM-Solver++, Lu et al. 2022b, sec. 5, at eta = 1).

Multistep DPM-Solver (Lu et al. 2022b, appendix B) and DPM-Solver++(2M)/(3M) (Lu et al. 2022b,
Algorithm 2 and appendix) reuse the model outputs of the previous one or two steps to form the
finite differences D1, D2, so every step costs one NFE. The order rules mirror diffusers'
`DPMSolverMultistepScheduler.step`:

    step i of n uses order 1 if i == 0 or the final step is "lower order", order <= 2 if i == 1 or
    it is the second-to-last step with lower_order_final and n < 15, else the requested order;
    the final step is lower order with euler_at_final, with lower_order_final and n < 15, or when it
    goes to sigma = 0 (diffusers' final_sigmas_type="zero"), which returns x0_hat.

Third order: diffusers (and Lu's reference code, k-diffusion) use D2 = (D1_0 - D1_1) / (r0 + r1),
which is h^2 m''/2, with the coefficient -alpha_t phi_3 that belongs to h^2 m'' (the singlestep
D2). The h^3 term is then half its Taylor value, a local error O(h^3): that 3M is globally second
order (measured on the exact Gaussian, tests/test_dpm_solver_pp.py). third_order="taylor" doubles
D2 and gives a true third-order multistep method; "diffusers" (default) keeps parity.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers import base
from diffusion.samplers.base import Method, Point, check_order, methods, point, scan_steps

ALGORITHMS = ("dpmsolver", "dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
THIRD_ORDER = ("diffusers", "taylor")
DPM_SOLVER = "DPM-Solver (Lu et al. 2022, NeurIPS, arXiv:2206.00927)"
DPM_SOLVER_PP = "DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095)"


class Coeffs(NamedTuple):
    """x_t = c_x x_s + c0 D0 + c1 D1 + c2 D2 + c_z z for one step s -> t."""

    c_x: jax.Array
    c0: jax.Array
    c1_mid: jax.Array
    c1_heun: jax.Array
    c2: jax.Array
    c_z: jax.Array


def coeffs(algorithm: str, s: Point, t: Point, eta: float = 0.0) -> Coeffs:
    """Step coefficients (diffusers' first/second/third-order updates; Lu et al. 2022, 3.7-3.8).

    eta > 0 (data prediction only) is the SDE solver: SDE-DPM-Solver++ (Lu et al. 2022b, sec. 5)
    for eta = 1, and k-diffusion's dpmpp_2m_sde / 3m_sde for any eta, with h_eta = (1 + eta) h:
    x_t = sigma_t/sigma_s e^{-eta h} x_s + alpha_t (1 - e^{-h_eta}) D0 + ...
          + sigma_t sqrt(1 - e^{-2 eta h}) z.
    """
    h = t.lam - s.lam
    zero = jnp.zeros_like(h)
    if algorithm == "dpmsolver":
        if eta != 0:
            raise ValueError("eta > 0 (the SDE solver) needs algorithm 'dpmsolver++'")
        ep = jnp.expm1(h)  # e^h - 1
        # sigma_t (e^h - 1) = alpha_t sigma_s / alpha_s - sigma_t: finite form for sigma_t = 0.
        sig_ep = jnp.where(jnp.isinf(h), t.alpha * s.sigma / s.alpha - t.sigma, t.sigma * ep)
        return Coeffs(
            c_x=t.alpha / s.alpha,
            c0=-sig_ep,
            c1_mid=-0.5 * sig_ep,
            c1_heun=-t.sigma * (ep / h - 1.0),
            c2=-t.sigma * ((ep - h) / h**2 - 0.5),
            c_z=zero,
        )
    if algorithm == "dpmsolver++":
        # eta is a Python number: eta = 0 keeps e^{-eta h} out (0 * inf at sigma_t = 0).
        h_eta = h if eta == 0 else (1.0 + eta) * h
        em = -jnp.expm1(-h_eta)  # 1 - e^{-h_eta}
        return Coeffs(
            c_x=t.sigma / s.sigma if eta == 0 else t.sigma / s.sigma * jnp.exp(-eta * h),
            c0=t.alpha * em,
            c1_mid=0.5 * t.alpha * em,
            c1_heun=t.alpha * (1.0 - em / h_eta),  # alpha_t phi_2
            c2=-t.alpha * ((h_eta - em) / h_eta**2 - 0.5),  # -alpha_t phi_3
            c_z=zero if eta == 0 else t.sigma * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)),
        )
    raise ValueError(f"unknown algorithm {algorithm!r}; valid: {list(ALGORITHMS)}")


def model_output(denoise_fn, x, t, p: Point, algorithm: str):
    """The quantity the solver integrates: x0_hat (DPM-Solver++) or eps_hat (DPM-Solver)."""
    x0_hat = denoise_fn(x, t)
    if algorithm == "dpmsolver":
        return (x - p.alpha * x0_hat) / p.sigma  # eps_hat
    return x0_hat


def check_solver_type(method: str, solver_type: str):
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"{method}: unknown solver_type {solver_type!r}; valid: {SOLVER_TYPES}")


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


def multistep_update(c, order, x, ms, lams, t: Point, z, *, solver_type, third_order):
    """One multistep update from the newest point to t with step coefficients c = coeffs(s0, t).

    ms[j] is the model output at lambda = lams[j] (j = 0 newest, then one and two steps back).
    """
    x_t = c.c_x * x + c.c0 * ms[0] + c.c_z * z
    if order == 1:
        return x_t
    h = t.lam - lams[0]
    r0 = (lams[0] - lams[1]) / h
    d1_0 = (ms[0] - ms[1]) / r0
    if order == 2:
        return x_t + (c.c1_mid if solver_type == "midpoint" else c.c1_heun) * d1_0
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (ms[1] - ms[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1) * (2.0 if third_order == "taylor" else 1.0)
    return x_t + c.c1_heun * d1 + c.c2 * d2


def run_multistep(
    method, denoise_fn, x, schedule, ts, *, algorithm, order, lower_order_final, euler_at_final,
    solver_type="midpoint", third_order="diffusers", update=None, eta=0.0, s_noise=1.0, rng=None,
    noises=None,
):  # fmt: skip
    """Multistep solver over grid ts; history (model outputs, lambdas) lives in the scan carry.

    `update(c, order, x, ms, lams, t, z)` is the step (default: multistep_update with solver_type
    and third_order; deis.py passes its own). eta > 0: SDE solver with noise z = s_noise N(0, I),
    from `noises` (num_steps, *x.shape) or fold_in(rng, i).
    """
    check_order(method, order, (1, 2, 3))
    check_solver_type(method, solver_type)
    if third_order not in THIRD_ORDER:
        raise ValueError(f"unknown third_order {third_order!r}; valid: {THIRD_ORDER}")
    if not isinstance(eta, int | float) or eta < 0:
        raise ValueError(f"{method}: eta must be a number >= 0, got {eta!r}")
    if update is None:
        update = functools.partial(
            multistep_update, solver_type=solver_type, third_order=third_order
        )
    n = ts.shape[0] - 1
    if eta > 0:
        noises = base.check_noises(noises, n, x, rng, method=method)
    static = multistep_orders(n, order, lower_order_final, euler_at_final)
    orders = jnp.where(ts[1:] == 0, 1, jnp.asarray(static))  # (n,) sigma = 0 end: first order
    dtype = x.dtype

    def step(carry, inp):
        x, m1, m2, lam1, lam2 = carry  # model outputs and lambdas of the previous two steps
        i, t_s, t_t = inp
        s0, t = point(schedule, t_s, dtype), point(schedule, t_t, dtype)
        c = coeffs(algorithm, s0, t, eta)
        m0 = model_output(denoise_fn, x, t_s, s0, algorithm)
        ms, lams = [m0, m1, m2], [s0.lam, lam1, lam2]
        z = s_noise * base.step_noise(rng, noises, i, x) if eta > 0 else jnp.zeros_like(x)
        branches = [lambda k=k: update(c, k, x, ms, lams, t, z) for k in range(1, order + 1)]
        x_next = jax.lax.switch(orders[i] - 1, branches)
        return x_next, m0, m1, s0.lam, lam1

    zeros = jnp.zeros_like(x)
    # Placeholder history lambdas (never used at order 1) must be finite.
    lam_T = point(schedule, ts[0], dtype).lam
    carry = (x, zeros, zeros, lam_T, lam_T)
    return scan_steps(step, carry, ts)[0]


# ------------------------------------------------------------------- the methods


def dpm_solver_multistep(
    denoise_fn, x, schedule, ts, *, rng=None, order: int = 2, solver_type: str = "midpoint",
    lower_order_final: bool = True, euler_at_final: bool = False, third_order: str = "diffusers",
):  # fmt: skip
    """Multistep DPM-Solver-1/2/3 (Lu et al. 2022b, arXiv:2211.01095, appendix B), noise
    prediction; diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver") order rules.

    Order k reuses the eps_hat of the previous k - 1 steps (one NFE a step); third_order as in the
    module docstring.
    """
    del rng
    return run_multistep(
        "dpm_solver_multistep", denoise_fn, x, schedule, ts, algorithm="dpmsolver", order=order,
        solver_type=solver_type, lower_order_final=lower_order_final,
        euler_at_final=euler_at_final, third_order=third_order,
    )  # fmt: skip


def dpmpp_multistep(
    denoise_fn, x, schedule, ts, *, rng=None, order: int = 2, solver_type: str = "midpoint",
    lower_order_final: bool = True, euler_at_final: bool = False, third_order: str = "diffusers",
):  # fmt: skip
    """Multistep DPM-Solver++(1/2/3M) (Lu et al. 2022b, arXiv:2211.01095, Algorithm 2 and
    appendix), data prediction; diffusers' DPMSolverMultistepScheduler (lower_order_final,
    euler_at_final). third_order: "diffusers" (parity, globally second order) or "taylor"."""
    del rng
    return run_multistep(
        "dpmpp_multistep", denoise_fn, x, schedule, ts, algorithm="dpmsolver++", order=order,
        solver_type=solver_type, lower_order_final=lower_order_final,
        euler_at_final=euler_at_final, third_order=third_order,
    )  # fmt: skip


def dpmpp_2m(
    denoise_fn, x, schedule, ts, *, rng=None, solver_type: str = "midpoint",
    lower_order_final: bool = True, euler_at_final: bool = False,
):  # fmt: skip
    """DPM-Solver++(2M) (Lu et al. 2022b, arXiv:2211.01095, Algorithm 2): with h_i = lambda_i -
    lambda_{i-1} and r = h_{i-1} / h_i,

        D = (1 + 1/(2r)) x0_hat_{i-1} - 1/(2r) x0_hat_{i-2}
        x_i = sigma_i / sigma_{i-1} x_{i-1} + alpha_i (1 - e^{-h_i}) D

    (first order on the first step and, with lower_order_final, on the last of fewer than 15).
    """
    del rng
    return run_multistep(
        "dpmpp_2m", denoise_fn, x, schedule, ts, algorithm="dpmsolver++", order=2,
        solver_type=solver_type, lower_order_final=lower_order_final,
        euler_at_final=euler_at_final,
    )  # fmt: skip


def dpmpp_3m(
    denoise_fn, x, schedule, ts, *, rng=None, solver_type: str = "midpoint",
    lower_order_final: bool = True, euler_at_final: bool = False, third_order: str = "diffusers",
):  # fmt: skip
    """DPM-Solver++(3M) (Lu et al. 2022b, arXiv:2211.01095, appendix, multistep third order):
    D1 and D2 from the last three x0_hat. third_order="diffusers" (default) is diffusers' and
    k-diffusion's update, globally second order; "taylor" is a true third-order method (module
    docstring)."""
    del rng
    return run_multistep(
        "dpmpp_3m", denoise_fn, x, schedule, ts, algorithm="dpmsolver++", order=3,
        solver_type=solver_type, lower_order_final=lower_order_final,
        euler_at_final=euler_at_final, third_order=third_order,
    )  # fmt: skip


def sde_dpmpp_2m(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, solver_type: str = "midpoint",
    lower_order_final: bool = True, euler_at_final: bool = False,
):  # fmt: skip
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, arXiv:2211.01095, sec. 5; diffusers'
    "sde-dpmsolver++" with solver_order=2): per step

        x_i = sigma_i/sigma_{i-1} e^{-h} x_{i-1} + alpha_i (1 - e^{-2h}) D
              + sigma_i sqrt(1 - e^{-2h}) z_i

    noises: None (draw z_i ~ N(0, I) from fold_in(rng, i)) or (num_steps, *x.shape) normals.
    """
    return run_multistep(
        "sde_dpmpp_2m", denoise_fn, x, schedule, ts, algorithm="dpmsolver++", order=2,
        solver_type=solver_type, lower_order_final=lower_order_final,
        euler_at_final=euler_at_final, eta=1.0, rng=rng, noises=noises,
    )  # fmt: skip


def dpmpp_2m_sde(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, eta: float = 1.0, s_noise: float = 1.0,
    solver_type: str = "midpoint",
):  # fmt: skip
    """DPM-Solver++(2M) SDE, k-diffusion's sample_dpmpp_2m_sde (Lu et al. 2022b, arXiv:2211.01095,
    sec. 5, generalised to a noise level eta): with h_eta = (1 + eta) h,

        x_i = sigma_i/sigma_{i-1} e^{-eta h} x_{i-1} + alpha_i (1 - e^{-h_eta}) x0_hat_{i-1}
              + [second-order term: midpoint 1/2, heun phi_2, times D1]
              + s_noise sigma_i sqrt(1 - e^{-2 eta h}) z_i

    First order on the first step, second order after; the step to sigma = 0 returns x0_hat (no
    lower_order_final: k-diffusion's rules). eta = 1 is sde_dpmpp_2m's update, eta = 0 dpmpp_2m.
    noises: None (z_i from fold_in(rng, i)) or (num_steps, *x.shape) normals; k-diffusion's
    Brownian-tree noise over disjoint steps is i.i.d. N(0, I) once normalised, so this is its law.
    """
    return run_multistep(
        "dpmpp_2m_sde", denoise_fn, x, schedule, ts, algorithm="dpmsolver++", order=2,
        solver_type=solver_type, lower_order_final=False, euler_at_final=False, eta=eta,
        s_noise=s_noise, rng=rng, noises=noises,
    )  # fmt: skip


def dpmpp_3m_sde(
    denoise_fn, x, schedule, ts, *, rng=None, noises=None, eta: float = 1.0, s_noise: float = 1.0
):  # fmt: skip
    """DPM-Solver++(3M) SDE, k-diffusion's sample_dpmpp_3m_sde (Lu et al. 2022b, arXiv:2211.01095,
    appendix and sec. 5): the 2M SDE step with the third-order term of dpmpp_3m, phi_2 D1 - phi_3 D2
    with phi_2 = 1 - (1 - e^{-h_eta}) / h_eta, phi_3 = phi_2 / h_eta - 1/2 (the "heun" second-order
    step on step 2). eta = 0 is dpmpp_3m with solver_type="heun" and lower_order_final=False.
    diffusers' sde-dpmsolver++ third order writes -alpha_t (phi_3 + 1) for the D2 coefficient (a
    sign slip: O(1) instead of O(h)), so it is not a reference here.
    """
    return run_multistep(
        "dpmpp_3m_sde", denoise_fn, x, schedule, ts, algorithm="dpmsolver++", order=3,
        solver_type="heun", lower_order_final=False, euler_at_final=False, eta=eta,
        s_noise=s_noise, rng=rng, noises=noises,
    )  # fmt: skip


_SDE = DPM_SOLVER_PP + ", SDE-DPM-Solver++, sec. 5"
METHODS = methods(
    dpm_solver_multistep=Method(
        dpm_solver_multistep,
        orders=(1, 2, 3),
        paper="Multistep DPM-Solver (Lu et al. 2022b, arXiv:2211.01095, appendix)",
    ),
    dpmpp_multistep=Method(
        dpmpp_multistep, orders=(1, 2, 3), paper=DPM_SOLVER_PP, data_prediction=True
    ),
    dpmpp_2m=Method(dpmpp_2m, paper=DPM_SOLVER_PP, data_prediction=True),
    dpmpp_3m=Method(dpmpp_3m, paper=DPM_SOLVER_PP, data_prediction=True),
    sde_dpmpp_2m=Method(sde_dpmpp_2m, stochastic=True, paper=_SDE, data_prediction=True),
    dpmpp_2m_sde=Method(
        dpmpp_2m_sde, stochastic=True, default_grid="karras", paper=_SDE, data_prediction=True
    ),
    dpmpp_3m_sde=Method(
        dpmpp_3m_sde, stochastic=True, default_grid="karras", paper=_SDE, data_prediction=True
    ),
)
