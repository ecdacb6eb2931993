"""DPM-Solver / DPM-Solver++ step coefficients and the singlestep solvers (shared core).

With lambda = log(alpha / sigma) and h = lambda_t - lambda_s, the exact solution of the diffusion
ODE from s to t is (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 9)

    noise prediction (DPM-Solver):  x_t = a_t/a_s x_s - a_t int e^{-lambda} eps_hat dlambda
    data prediction (DPM-Solver++): x_t = s_t/s_s x_s + s_t int e^{lambda} x0_hat dlambda

(a = alpha, s = sigma)
and a k-th order solver Taylor-expands the model output m (eps_hat or x0_hat) in lambda:
x_t = c_x x_s + c0 D0 + c1 D1 + c2 D2 with D0 = m, D1 ~ h m', D2 ~ h^2 m'' / 2. The coefficients
below are diffusers' (`DPMSolverMultistepScheduler` / `DPMSolverSinglestepScheduler`), written
with expm1 for accuracy at small h. solver_type "midpoint" (diffusers' default; Lu's "dpmsolver")
and "heun" (Lu's "taylor") differ only in the D1 coefficient of second-order updates and in the
third-order singlestep update. "sde-dpmsolver++" is SDE-DPM-Solver++ (Lu et al. 2022b, sec. 5).

A step to sigma_t = 0 (lambda_t = inf, the last step of the default grids) is always first order,
as diffusers' `final_sigmas_type="zero"`: it returns x0_hat(x_s, s) (DPM-Solver++) or the same
value written with eps_hat (DPM-Solver), with no inf * 0 anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers.base import check_order, scan_steps

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
INTERMEDIATE = ("logsnr", "grid")


class Point(NamedTuple):
    """Schedule values at one time: alpha_t, sigma_t, lambda_t."""

    alpha: jax.Array
    sigma: jax.Array
    lam: jax.Array


def point(schedule, t, dtype) -> Point:
    return Point(
        jnp.asarray(schedule.alpha(t), dtype),
        jnp.asarray(schedule.sigma(t), dtype),
        jnp.asarray(schedule.logsnr(t), dtype),
    )


class Coeffs(NamedTuple):
    """x_t = c_x x_s + c0 D0 + c1 D1 + c2 D2 + c_z z for one step s -> t."""

    c_x: jax.Array
    c0: jax.Array
    c1_mid: jax.Array
    c1_heun: jax.Array
    c2: jax.Array
    c_z: jax.Array


def coeffs(algorithm: str, s: Point, t: Point) -> Coeffs:
    """Step coefficients (diffusers' first/second/third-order updates; Lu et al. 2022, 3.7-3.8)."""
    h = t.lam - s.lam
    zero = jnp.zeros_like(h)
    if algorithm == "dpmsolver":
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
        em = -jnp.expm1(-h)  # 1 - e^{-h}
        return Coeffs(
            c_x=t.sigma / s.sigma,
            c0=t.alpha * em,
            c1_mid=0.5 * t.alpha * em,
            c1_heun=t.alpha * (1.0 - em / h),
            c2=-t.alpha * ((h - em) / h**2 - 0.5),
            c_z=zero,
        )
    if algorithm == "sde-dpmsolver++":
        em2 = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
        return Coeffs(
            c_x=t.sigma / s.sigma * jnp.exp(-h),
            c0=t.alpha * em2,
            c1_mid=0.5 * t.alpha * em2,
            c1_heun=t.alpha * (1.0 - em2 / (2.0 * h)),
            c2=t.alpha * ((em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5),
            c_z=t.sigma * jnp.sqrt(em2),
        )
    raise ValueError(f"unknown algorithm {algorithm!r}; valid: {list(ALGORITHMS)}")


def model_output(denoise_fn, x, t, p: Point, algorithm: str):
    """The quantity the solver integrates: x0_hat (DPM-Solver++) or eps_hat (DPM-Solver)."""
    x0_hat = denoise_fn(x, t)
    if algorithm == "dpmsolver":
        return (x - p.alpha * x0_hat) / p.sigma  # eps_hat
    return x0_hat


def check_options(method: str, solver_type: str, intermediate: str = "logsnr"):
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"{method}: unknown solver_type {solver_type!r}; valid: {SOLVER_TYPES}")
    if intermediate not in INTERMEDIATE:
        raise ValueError(f"{method}: unknown intermediate {intermediate!r}; valid: {INTERMEDIATE}")


# ------------------------------------------------------------------- singlestep updates


def singlestep_update(alg, solver_type, order, x_s, ms, pts, t: Point):
    """Singlestep update of the given order from pts[0] to t (diffusers `singlestep_dpm_solver_*`).

    ms: model outputs at pts (block start s, then intermediate s1, s2), r_i = (lambda_si -
    lambda_s) / h. Order 3 "midpoint" is Lu's DPM-Solver-3 final update (only s2 used), "heun" the
    Taylor form with D1 and D2.
    """
    s = pts[0]
    c = coeffs(alg, s, t)
    x_t = c.c_x * x_s + c.c0 * ms[0]
    if order == 1:
        return x_t
    h = t.lam - s.lam
    if order == 2:
        d1 = (ms[1] - ms[0]) / ((pts[1].lam - s.lam) / h)
        return x_t + (c.c1_mid if solver_type == "midpoint" else c.c1_heun) * d1
    r1, r2 = (pts[1].lam - s.lam) / h, (pts[2].lam - s.lam) / h
    d1_0, d1_1 = (ms[1] - ms[0]) / r1, (ms[2] - ms[0]) / r2
    if solver_type == "midpoint":
        return x_t + c.c1_heun * d1_1
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return x_t + c.c1_heun * d1 + c.c2 * d2


def _paper_step(denoise_fn, schedule, alg, solver_type, order, x, t_s, t_t):
    """One singlestep DPM-Solver-k step (Lu et al. 2022, Algorithms 4-5; 2022b, Algorithm 1).

    Intermediate times at lambda_s + r h: r1 = 1/2 (order 2), r1 = 1/3, r2 = 2/3 (order 3). As in
    Lu's code, the order-3 point s2 is reached with the "heun" (Taylor) second-order update.
    """
    dtype = x.dtype
    s, t = point(schedule, t_s, dtype), point(schedule, t_t, dtype)
    ms = [model_output(denoise_fn, x, t_s, s, alg)]
    if order == 1:
        return singlestep_update(alg, solver_type, 1, x, ms, [s], t)
    h = t.lam - s.lam
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    ts_mid = [schedule.t_from_logsnr(s.lam + r * h).astype(t_s.dtype) for r in rs]
    pts = [s] + [point(schedule, tm, dtype) for tm in ts_mid]
    u1 = singlestep_update(alg, solver_type, 1, x, ms, pts[:1], pts[1])
    ms.append(model_output(denoise_fn, u1, ts_mid[0], pts[1], alg))
    if order == 3:
        u2 = singlestep_update(alg, "heun", 2, x, ms, pts[:2], pts[2])
        ms.append(model_output(denoise_fn, u2, ts_mid[1], pts[2], alg))
    return singlestep_update(alg, solver_type, order, x, ms, pts, t)


def run_paper(denoise_fn, x, schedule, ts, orders, *, algorithm, solver_type, static=True):
    """Singlestep solver with per-step orders (list of ints) over grid ts.

    A step to t = 0 is taken as a first-order step (1 NFE, returns x0_hat). With a concrete grid
    the orders are static: one lax.scan per run of equal orders (constant order: the steps, then
    the first-order step to t = 0), each body holding only its own order's denoiser calls. A
    traced grid, or static=False (DPM-Solver-fast, whose runs of orders depend on num_steps), gives
    one scan that picks the order per step with lax.switch.
    """

    def order_step(k):
        def step(x, inp):
            _, t_s, t_t = inp
            return _paper_step(denoise_fn, schedule, algorithm, solver_type, k, x, t_s, t_t)

        return step

    if static and not isinstance(ts, jax.core.Tracer):
        per_step = np.where(np.asarray(ts)[1:] == 0, 1, np.asarray(orders))  # (num_steps,)
        start = 0
        for end in range(1, len(per_step) + 1):
            if end == len(per_step) or per_step[end] != per_step[start]:
                x = scan_steps(order_step(int(per_step[start])), x, ts[start : end + 1])
                start = end
        return x

    traced = jnp.where(ts[1:] == 0, 1, jnp.asarray(orders, jnp.int32))  # (num_steps,)
    branches = [order_step(k) for k in range(1, max(orders) + 1)]

    def step(x, inp):
        return jax.lax.switch(traced[inp[0]] - 1, branches, x, inp)

    return scan_steps(step, x, ts)


# ------------------------------------------------------------------- diffusers grid mode


def diffusers_order_list(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """`DPMSolverSinglestepScheduler.get_order_list` (without the final-sigma-zero rule)."""
    n = num_steps
    if lower_order_final or n % order != 0:  # diffusers forces lower_order_final for uneven n
        if order == 3:
            if n % 3 == 0:
                return [1, 2, 3] * (n // 3 - 1) + [1, 2] + [1]
            return [1, 2, 3] * (n // 3) + ([1] if n % 3 == 1 else [1, 2])
        if order == 2:
            return [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
        return [1] * n
    return {1: [1], 2: [1, 2], 3: [1, 2, 3]}[order] * (n // order)


def run_grid(denoise_fn, x, schedule, ts, *, algorithm, solver_type, order, lower_order_final):
    """diffusers `DPMSolverSinglestepScheduler`: grid points are the intermediate times.

    One NFE per grid interval. Steps follow diffusers' order list [1, 2, 3, 1, 2, 3, ...]; an
    order-k step restarts from the sample at the start of its block (the last order-1 step) with
    the k model outputs since then. A final step to sigma = 0 forces lower_order_final and order 1.
    """
    n = ts.shape[0] - 1
    base = jnp.asarray(diffusers_order_list(n, order, lower_order_final), jnp.int32)
    final0 = jnp.asarray(diffusers_order_list(n, order, True)[:-1] + [1], jnp.int32)
    orders = jnp.where(ts[-1] == 0, final0, base)  # (n,)
    dtype = x.dtype

    def upd(k, x_block, ms, i, t):
        pts = [point(schedule, ts[jnp.maximum(i - k + 1 + j, 0)], dtype) for j in range(k)]
        return singlestep_update(algorithm, solver_type, k, x_block, ms, pts, t)

    def step(carry, inp):
        x, x_block, m_a, m_b = carry  # m_a, m_b: model outputs of the previous two steps
        i, t_s, t_t = inp
        m0 = model_output(denoise_fn, x, t_s, point(schedule, t_s, dtype), algorithm)
        o = orders[i]
        x_block = jnp.where(o == 1, x, x_block)
        t = point(schedule, t_t, dtype)
        branches = [
            lambda xb: upd(1, xb, [m0], i, t),
            lambda xb: upd(2, xb, [m_a, m0], i, t),
            lambda xb: upd(3, xb, [m_b, m_a, m0], i, t),
        ]
        x_next = jax.lax.switch(o - 1, branches[:order], x_block)
        return x_next, x_block, m0, m_a

    zeros = jnp.zeros_like(x)
    return scan_steps(step, (x, x, zeros, zeros), ts)[0]


# ------------------------------------------------------------------- DPM-Solver-fast


def singlestep_runner(method: str, algorithm: str, default_order: int, doc: str):
    """The `run` of a singlestep method over ts: intermediate="logsnr" takes the paper's points
    (run_paper, `order` NFE a step), "grid" diffusers' grid points (run_grid; lower_order_final is
    used there only). Options are explicit keywords so that sample() can reject unknown ones."""

    def run(
        denoise_fn,
        x,
        schedule,
        ts,
        *,
        rng=None,
        order: int = default_order,
        solver_type: str = "midpoint",
        intermediate: str = "logsnr",
        lower_order_final: bool = True,
    ):
        del rng
        check_order(method, order, (1, 2, 3))
        check_options(method, solver_type, intermediate)
        kw = dict(algorithm=algorithm, solver_type=solver_type)
        if intermediate == "grid":
            return run_grid(
                denoise_fn, x, schedule, ts, order=order, lower_order_final=lower_order_final, **kw
            )
        return run_paper(denoise_fn, x, schedule, ts, [order] * (ts.shape[0] - 1), **kw)

    run.__doc__ = doc
    return run


def fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast step orders for an NFE budget (Lu et al. 2022, sec. 3.4 / appendix)."""
    k = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + ([1] if nfe % 3 == 1 else [2])


def ends_at_zero(ts, method: str) -> bool:
    """Whether a concrete grid ends at t = 0 (methods whose step count depends on it)."""
    if isinstance(ts, jax.core.Tracer):
        raise ValueError(
            f"{method} builds its own step list from the grid's end points: pass a concrete grid "
            "(not a traced array)"
        )
    return bool(np.asarray(ts)[-1] == 0)


def run_fast(denoise_fn, x, schedule, ts, *, algorithm, solver_type, method="dpm_solver_fast"):
    """DPM-Solver-fast with NFE budget num_steps = len(ts) - 1, on a uniform logSNR grid.

    Only the grid's end points are used: K = floor(N/3) + 1 steps uniform in lambda from ts[0] to
    the last time t_end, orders 3, ..., 3 and then (2, 1), (1) or (2) for N mod 3 = 0, 1, 2. If the
    grid ends at t = 0, the budget N - 1 is spent from ts[0] to ts[-2] and a first-order step
    (1 NFE, x0_hat) goes to 0, so the NFE is exactly N either way.
    """
    budget = ts.shape[0] - 1
    zero_end = ends_at_zero(ts, method)
    t_end = ts[-2] if zero_end else ts[-1]
    budget -= int(zero_end)
    orders = fast_orders(budget) if budget > 0 else []
    lam0, lam1 = schedule.logsnr(ts[0]), schedule.logsnr(t_end)
    lams = jnp.linspace(lam0, lam1, len(orders) + 1)[1:-1]
    inner = schedule.t_from_logsnr(lams).astype(ts.dtype)
    grid = [ts[:1], inner, jnp.stack([t_end])] if orders else [ts[:1]]
    if zero_end:
        grid.append(ts[-1:])
        orders = orders + [1]
    grid = jnp.concatenate(grid)  # (len(orders) + 1,)
    return run_paper(
        denoise_fn, x, schedule, grid, orders, algorithm=algorithm, solver_type=solver_type,
        static=False,
    )  # fmt: skip
