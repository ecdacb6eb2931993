"""Adaptive step size DPM-Solver-12 / 23 (Lu et al. 2022, NeurIPS, arXiv:2206.00927, sec. 3.4 and
Algorithm 4 (appendix C)), with k-diffusion's PID step-size controller (sample_dpm_adaptive).

Each attempt from lambda_s to lambda_t = min(lambda_end, lambda_s + h) computes a lower- and a
higher-order DPM-Solver step that share their model evaluations (order 3: DPM-Solver-2 with
r1 = 1/3 and DPM-Solver-3, 3 NFE; order 2: DPM-Solver-1 and -2, 2 NFE), and the scaled error

    delta = max(atol, rtol max(|x_low|, |x_prev|)),  E = ||(x_low - x_high) / delta||_2 / sqrt(N)

over all N numbers of the batch (k-diffusion; Lu's code takes the max over samples of
per-sample RMS). The controller (Söderlind 2003, digital filters in adaptive time-stepping) proposes
h <- h * (1 + atan(f - 1)), f = e_0^{b1} e_1^{b2} e_2^{b3}, e = 1 / (E + 1e-8),
b1 = (p + i + d) / order, b2 = -(p + 2 d) / order, b3 = d / order; the attempt is accepted when
the limited factor is >= accept_safety (then x <- x_high, lambda_s <- lambda_t). With the
defaults (p = d = 0, i = 1) this is the classical integral controller h * E^{-1/order}.

The loop is one `lax.while_loop`: the number of steps is not known before the run, so `nfe()`
cannot count it; the method returns (x, info) with info["nfe"], "steps" (attempts), "n_accept",
"n_reject" (sample(..., return_info=True)). Only the grid's end points are used: the solver
integrates from ts[0] to ts[-1], or to schedule.t_min when ts[-1] = 0, and then takes one
first-order step to t = 0 (x0_hat, one more NFE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.samplers.base import Method, check_order, methods, point
from diffusion.samplers.dpm_multistep import DPM_SOLVER, model_output
from diffusion.samplers.dpm_singlestep import singlestep_update


def _attempt(denoise_fn, schedule, order, x, lam_s, lam_t):
    """(x_low, x_high) from lambda_s to lambda_t: DPM-Solver-(order - 1) and DPM-Solver-order."""
    dtype = x.dtype
    t_s, t_t = schedule.t_from_logsnr(lam_s), schedule.t_from_logsnr(lam_t)
    s, t = point(schedule, t_s, dtype), point(schedule, t_t, dtype)
    h = lam_t - lam_s
    rs = (0.5,) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    ts_mid = [schedule.t_from_logsnr(lam_s + r * h) for r in rs]
    pts = [s] + [point(schedule, tm, dtype) for tm in ts_mid]
    ms = [model_output(denoise_fn, x, t_s, s, "dpmsolver")]
    u1 = singlestep_update("dpmsolver", "midpoint", 1, x, ms, pts[:1], pts[1])
    ms.append(model_output(denoise_fn, u1, ts_mid[0], pts[1], "dpmsolver"))
    if order == 2:
        x_low = singlestep_update("dpmsolver", "midpoint", 1, x, ms[:1], pts[:1], t)
        return x_low, singlestep_update("dpmsolver", "midpoint", 2, x, ms, pts, t)
    x_low = singlestep_update("dpmsolver", "midpoint", 2, x, ms, pts[:2], t)  # r1 = 1/3
    u2 = singlestep_update("dpmsolver", "heun", 2, x, ms, pts[:2], pts[2])
    ms.append(model_output(denoise_fn, u2, ts_mid[1], pts[2], "dpmsolver"))
    return x_low, singlestep_update("dpmsolver", "midpoint", 3, x, ms, pts, t)


def dpm_adaptive(
    denoise_fn, x, schedule, ts, *, rng=None, order: int = 3, rtol: float = 0.05,
    atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0,
    dcoeff: float = 0.0, accept_safety: float = 0.81, max_steps: int = 1000,
):  # fmt: skip
    """DPM-Solver-12 / 23 with adaptive step size (Lu et al. 2022, Algorithm 4; k-diffusion's
    sample_dpm_adaptive with eta = 0); defaults as k-diffusion. Returns (x_0, info). max_steps
    bounds the attempts (the run then stops where it is; info["steps"] == max_steps says so)."""
    del rng
    check_order("dpm_adaptive", order, (2, 3))
    if not (rtol > 0 and atol > 0 and h_init > 0):
        raise ValueError(
            f"dpm_adaptive: rtol, atol and h_init must be > 0, got rtol={rtol}, atol={atol}, "
            f"h_init={h_init}"
        )
    dtype = x.dtype
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order
    t_end = jnp.where(ts[-1] > 0, ts[-1], schedule.t_min)
    lam_start = schedule.logsnr(ts[0]).astype(dtype)
    lam_end = schedule.logsnr(t_end).astype(dtype)
    zero = jnp.zeros((), jnp.int32)

    def cond(c):
        return (c["lam"] < lam_end - 1e-5) & (c["steps"] < max_steps)

    def body(c):
        lam_t = jnp.minimum(lam_end, c["lam"] + c["h"])
        x_low, x_high = _attempt(denoise_fn, schedule, order, c["x"], c["lam"], lam_t)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(c["x_prev"])))
        error = jnp.sqrt(jnp.mean(((x_low - x_high) / delta) ** 2))
        inv = 1.0 / (error + 1e-8)
        errs = jnp.where(c["steps"] == 0, inv, c["errs"]).at[0].set(inv)  # (3,) newest first
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1.0 + jnp.arctan(factor - 1.0)
        accept = factor >= accept_safety
        return {
            "x": jnp.where(accept, x_high, c["x"]),
            "x_prev": jnp.where(accept, x_low, c["x_prev"]),
            "lam": jnp.where(accept, lam_t, c["lam"]),
            "h": c["h"] * factor,
            "errs": jnp.where(accept, jnp.stack([errs[0], errs[0], errs[1]]), errs),
            "steps": c["steps"] + 1,
            "n_accept": c["n_accept"] + accept.astype(jnp.int32),
        }

    init = {
        "x": x, "x_prev": x, "lam": lam_start, "h": jnp.asarray(h_init, dtype),
        "errs": jnp.ones((3,), dtype), "steps": zero, "n_accept": zero,
    }  # fmt: skip
    c = jax.lax.while_loop(cond, body, init)
    x = c["x"]
    to_zero = ts[-1] == 0
    x = jax.lax.cond(to_zero, lambda: denoise_fn(x, t_end.astype(ts.dtype)), lambda: x)
    steps = c["steps"]
    info = {
        "nfe": order * steps + to_zero.astype(jnp.int32),
        "steps": steps,
        "n_accept": c["n_accept"],
        "n_reject": steps - c["n_accept"],
    }
    return x, info


METHODS = methods(
    dpm_adaptive=Method(
        dpm_adaptive, orders=(2, 3), default_grid="logsnr", adaptive=True,
        paper=DPM_SOLVER + ", adaptive step size (Algorithm 4)",
    ),
)  # fmt: skip
