"""Singlestep DPM-Solver and DPM-Solver++: the singlestep updates, loops and methods.

A singlestep method spends `order` NFE per step, at intermediate points inside the step (the step
coefficients and the exponential-integrator form are in dpm_multistep.py, `coeffs`):
intermediate="logsnr" (default) puts them at lambda_s + r h (the papers' r1 = 1/2; r1 = 1/3,
r2 = 2/3), intermediate="grid" is diffusers' DPMSolverSinglestepScheduler, which takes the grid
points themselves as intermediate times (one NFE per grid interval). solver_type "midpoint"
(diffusers' default; Lu's "dpmsolver") and "heun" (Lu's "taylor") differ only in the D1
coefficient of second-order updates and in the third-order update.

A step to sigma_t = 0 (lambda_t = inf, the last step of the default grids) is always first order,
as diffusers' `final_sigmas_type="zero"`: it returns x0_hat(x_s, s) (DPM-Solver++) or the same
value written with eps_hat (DPM-Solver), with no inf * 0 anywhere. NFE (`singlestep_nfe`) of
"logsnr" methods: order * (num_steps - 1) + 1 on grids ending at t = 0 (the default grids),
order * num_steps on grids ending at t_end > 0 (the paper's convention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers.base import Method, Point, check_order, methods, point, scan_steps
from diffusion.samplers.dpm_multistep import (
    ALGORITHMS,
    DPM_SOLVER,
    DPM_SOLVER_PP,
    check_solver_type,
    coeffs,
    model_output,
)

INTERMEDIATE = ("logsnr", "grid")
S2_UPDATES = (None, "taylor", "solver_type")


def check_options(method: str, solver_type: str, intermediate: str = "logsnr"):
    check_solver_type(method, solver_type)
    if intermediate not in INTERMEDIATE:
        raise ValueError(f"{method}: unknown intermediate {intermediate!r}; valid: {INTERMEDIATE}")


def singlestep_nfe(num_steps, order, intermediate="logsnr", ends_at_zero=True, **_):
    """NFE of singlestep DPM-Solver / DPM-Solver++ (the last step to t = 0 is first order)."""
    if intermediate == "grid":
        return num_steps
    return order * num_steps - (order - 1) * int(ends_at_zero)


# ------------------------------------------------------------------- updates and loops


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


def _paper_step(denoise_fn, schedule, alg, solver_type, s2_solver, order, x, t_s, t_t):
    """One singlestep DPM-Solver-k step (Lu et al. 2022, Algorithms 4-5; 2022b, Algorithm 1).

    Intermediate times at lambda_s + r h: r1 = 1/2 (order 2), r1 = 1/3, r2 = 2/3 (order 3). The
    order-3 point s2 is reached with the second-order update of type s2_solver ("heun", the
    Taylor form, in Lu's code).
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
        u2 = singlestep_update(alg, s2_solver, 2, x, ms, pts[:2], pts[2])
        ms.append(model_output(denoise_fn, u2, ts_mid[1], pts[2], alg))
    return singlestep_update(alg, solver_type, order, x, ms, pts, t)


def run_paper(
    denoise_fn, x, schedule, ts, orders, *, algorithm, solver_type, s2_solver="heun", static=True
):
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
            args = (denoise_fn, schedule, algorithm, solver_type, s2_solver, k, x, t_s, t_t)
            return _paper_step(*args)

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


def run_grid(
    denoise_fn, x, schedule, ts, *, algorithm, solver_type, order, lower_order_final,
    s2_solver=None,
):  # fmt: skip
    """diffusers `DPMSolverSinglestepScheduler`: grid points are the intermediate times.

    One NFE per grid interval. Steps follow diffusers' order list [1, 2, 3, 1, 2, 3, ...]; an
    order-k step restarts from the sample at the start of its block (the last order-1 step) with
    the k model outputs since then. A final step to sigma = 0 forces lower_order_final and order 1.
    An order-2 step that reaches the s2 point of an order-3 block uses s2_solver (diffusers:
    solver_type; Lu's code: "heun").
    """
    n = ts.shape[0] - 1
    base = jnp.asarray(diffusers_order_list(n, order, lower_order_final), jnp.int32)
    final0 = jnp.asarray(diffusers_order_list(n, order, True)[:-1] + [1], jnp.int32)
    orders = jnp.where(ts[-1] == 0, final0, base)  # (n,)
    to_s2 = jnp.concatenate([orders[1:] == 3, jnp.zeros((1,), bool)])  # (n,) next step order 3
    dtype = x.dtype

    def upd(k, x_block, ms, i, t, solver=solver_type):
        pts = [point(schedule, ts[jnp.maximum(i - k + 1 + j, 0)], dtype) for j in range(k)]
        return singlestep_update(algorithm, solver, k, x_block, ms, pts, t)

    def upd2(xb, ms, i, t):
        if s2_solver in (None, solver_type):
            return upd(2, xb, ms, i, t)
        return jnp.where(to_s2[i], upd(2, xb, ms, i, t, s2_solver), upd(2, xb, ms, i, t))

    def step(carry, inp):
        x, x_block, m_a, m_b = carry  # m_a, m_b: model outputs of the previous two steps
        i, t_s, t_t = inp
        m0 = model_output(denoise_fn, x, t_s, point(schedule, t_s, dtype), algorithm)
        o = orders[i]
        x_block = jnp.where(o == 1, x, x_block)
        t = point(schedule, t_t, dtype)
        branches = [
            lambda xb: upd(1, xb, [m0], i, t),
            lambda xb: upd2(xb, [m_a, m0], i, t),
            lambda xb: upd(3, xb, [m_b, m_a, m0], i, t),
        ]
        x_next = jax.lax.switch(o - 1, branches[:order], x_block)
        return x_next, x_block, m0, m_a

    zeros = jnp.zeros_like(x)
    return scan_steps(step, (x, x, zeros, zeros), ts)[0]


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


def run_singlestep(
    method, algorithm, denoise_fn, x, schedule, ts, order, solver_type, intermediate, lof,
    s2_update=None,
):  # fmt: skip
    """Checks the options, then the paper's points (run_paper) or diffusers' grid (run_grid;
    lower_order_final `lof` is used there only). s2_update: how an order-3 step reaches its second
    intermediate point: "taylor" (the DPM-Solver authors' code, whatever solver_type; default with
    intermediate="logsnr") or "solver_type" (diffusers; default with intermediate="grid")."""
    check_order(method, order, (1, 2, 3))
    check_options(method, solver_type, intermediate)
    if s2_update not in S2_UPDATES:
        raise ValueError(f"{method}: unknown s2_update {s2_update!r}; valid: {S2_UPDATES}")
    kw = dict(algorithm=algorithm, solver_type=solver_type)
    if intermediate == "grid":
        s2 = "heun" if s2_update == "taylor" else solver_type
        return run_grid(
            denoise_fn, x, schedule, ts, order=order, lower_order_final=lof, s2_solver=s2, **kw
        )
    s2 = solver_type if s2_update == "solver_type" else "heun"
    return run_paper(denoise_fn, x, schedule, ts, [order] * (ts.shape[0] - 1), s2_solver=s2, **kw)


# ------------------------------------------------------------------- the methods


def dpm_solver(
    denoise_fn, x, schedule, ts, *, rng=None, order: int = 3, solver_type: str = "midpoint",
    intermediate: str = "logsnr", lower_order_final: bool = True, s2_update: str | None = None,
):  # fmt: skip
    """Singlestep DPM-Solver-1/2/3 (Lu et al. 2022, arXiv:2206.00927, Algorithms 1-2, eqs. 3.7-3.8
    and appendix), noise prediction: integrates eps_hat = (x_t - alpha_t x0_hat) / sigma_t.

    order 1 is DDIM; order 2 takes the midpoint lambda_s + h/2 (eq. 3.7); order 3 the points
    lambda_s + h/3, lambda_s + 2h/3 (eq. 3.8), `order` NFE a step. intermediate="grid":
    diffusers' DPMSolverSinglestepScheduler(algorithm_type="dpmsolver"), one NFE per grid interval.
    s2_update: see run_singlestep ("taylor" is the authors' convention).
    """
    del rng
    return run_singlestep(
        "dpm_solver", "dpmsolver", denoise_fn, x, schedule, ts, order, solver_type, intermediate,
        lower_order_final, s2_update,
    )  # fmt: skip


def dpm_solver_fast(
    denoise_fn, x, schedule, ts, *, rng=None, solver_type: str = "midpoint",
    algorithm_type: str = "dpmsolver",
):  # fmt: skip
    """DPM-Solver-fast (Lu et al. 2022, arXiv:2206.00927, sec. 3.4), noise prediction.

    num_steps is the NFE BUDGET N, not the number of steps: K = floor(N/3) + 1 steps uniform in
    logSNR between the grid's end points, DPM-Solver-3 except the last one or two (N mod 3); see
    run_fast. algorithm_type="dpmsolver++" is the authors' DPM-Solver++ variant (their code's
    `DPM_Solver(algorithm_type="dpmsolver++").sample(method="singlestep")`): the same steps and
    orders with the data-prediction updates of dpmpp_singlestep.
    """
    del rng
    check_options("dpm_solver_fast", solver_type)
    if algorithm_type not in ALGORITHMS:
        raise ValueError(f"dpm_solver_fast: unknown algorithm_type {algorithm_type!r}; valid: "
                         f"{ALGORITHMS}")  # fmt: skip
    return run_fast(denoise_fn, x, schedule, ts, algorithm=algorithm_type, solver_type=solver_type)


def dpmpp_singlestep(
    denoise_fn, x, schedule, ts, *, rng=None, order: int = 2, solver_type: str = "midpoint",
    intermediate: str = "logsnr", lower_order_final: bool = True, s2_update: str | None = None,
):  # fmt: skip
    """Singlestep DPM-Solver++(1/2/3S) (Lu et al. 2022b, arXiv:2211.01095, Algorithm 1 and
    appendix), data prediction: integrates x0_hat.

    order 2 (default, as diffusers) takes r1 = 1/2, order 3 r1 = 1/3, r2 = 2/3; `order` NFE a step.
    intermediate="grid": diffusers' DPMSolverSinglestepScheduler, one NFE per grid interval.
    s2_update: see run_singlestep ("taylor" is the authors' convention).
    """
    del rng
    return run_singlestep(
        "dpmpp_singlestep", "dpmsolver++", denoise_fn, x, schedule, ts, order, solver_type,
        intermediate, lower_order_final, s2_update,
    )  # fmt: skip


def dpmpp_2s(
    denoise_fn, x, schedule, ts, *, rng=None, solver_type: str = "midpoint",
    intermediate: str = "logsnr", lower_order_final: bool = True,
):  # fmt: skip
    """DPM-Solver++(2S) (Lu et al. 2022b, arXiv:2211.01095, Algorithm 1): per step from s to t,
    with s1 at lambda_s + r h, r = 1/2 (2 NFE a step; dpmpp_singlestep with order 2),

        u = sigma_s1/sigma_s x_s + alpha_s1 (1 - e^{-r h}) x0_hat_s
        D = (1 - 1/(2r)) x0_hat_s + 1/(2r) x0_hat(u, s1)
        x_t = sigma_t/sigma_s x_s + alpha_t (1 - e^{-h}) D
    """
    del rng
    return run_singlestep(
        "dpmpp_2s", "dpmsolver++", denoise_fn, x, schedule, ts, 2, solver_type, intermediate,
        lower_order_final,
    )  # fmt: skip


METHODS = methods(
    dpm_solver=Method(
        dpm_solver, functools.partial(singlestep_nfe, order=3), default_grid="logsnr",
        orders=(1, 2, 3), paper=DPM_SOLVER,
    ),
    dpm_solver_fast=Method(
        dpm_solver_fast, default_grid="logsnr", paper=DPM_SOLVER + ", DPM-Solver-fast"
    ),
    dpmpp_singlestep=Method(
        dpmpp_singlestep, functools.partial(singlestep_nfe, order=2), default_grid="logsnr",
        orders=(1, 2, 3), paper=DPM_SOLVER_PP, data_prediction=True,
    ),
    dpmpp_2s=Method(
        dpmpp_2s, functools.partial(singlestep_nfe, order=2), default_grid="logsnr",
        paper=DPM_SOLVER_PP, data_prediction=True,
    ),
)  # fmt: skip
