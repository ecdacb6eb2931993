"""Samplers: pure functions over a denoiser, one compiled loop per run.

    x0 = sample(denoise_fn, x_T, schedule, method="dpmpp_2m", num_steps=20)

`denoise_fn(x_t, t) -> x0_hat` (see predictions.as_denoiser and guidance.py); x_T is the state at
the grid's first time (draw it with `prior`; sample() never rescales it). `sample` is traceable:
wrap it in `jax.jit` with the static arguments, as the benchmark does. `SAMPLERS` lists the
methods; `nfe(method, num_steps, **options)` is the exact number of denoiser calls, and
`sample(..., return_info=True)` returns (x0, info) with info["nfe"] the calls made (the only
way to learn it for the adaptive method, dpm_adaptive). Samplers that integrate x0_hat
(Method.data_prediction) take dynamic thresholding: `thresholding=True`,
`dynamic_thresholding_ratio`, `sample_max_value` (diffusers' names and defaults).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers import (
    ancestral,
    ddim,
    ddpm,
    deis,
    dpm_adaptive,
    dpm_multistep,
    dpm_singlestep,
    flow,
    lcm,
    lms,
    pndm,
    unipc,
)
from diffusion.samplers.base import Method, check_order, dynamic_threshold
from diffusion.samplers.grids import GRIDS, check_grid, time_grid
from diffusion.schedules import Schedule

SAMPLERS: dict[str, Method] = {
    **ddpm.METHODS,
    **ddim.METHODS,
    **dpm_singlestep.METHODS,
    **dpm_multistep.METHODS,
    **dpm_adaptive.METHODS,
    **unipc.METHODS,
    **deis.METHODS,
    **pndm.METHODS,
    **lms.METHODS,
    **flow.METHODS,
    **ancestral.METHODS,
    **lcm.METHODS,
}
# Options sample() handles for data-prediction methods (diffusers' names and defaults).
THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

__all__ = ["GRIDS", "SAMPLERS", "Method", "check_grid", "get", "nfe", "prior", "sample"]
__all__ += ["time_grid"]


def get(method: str) -> Method:
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[method]


def _check_options(m: Method, options: dict) -> dict:
    """Reject unknown options (listing the valid ones); return the thresholding settings."""
    thresh = {k: options.pop(k) for k in list(options) if k in THRESHOLDING}
    if thresh and not m.data_prediction:
        valid = sorted(k for k, v in SAMPLERS.items() if v.data_prediction)
        raise ValueError(
            f"{m.name} does not predict data (it integrates eps_hat or the ODE velocity): "
            f"{sorted(thresh)} apply to data-prediction samplers only: {valid}"
        )
    params = inspect.signature(m.run).parameters
    allowed = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k != "rng"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        if m.data_prediction:
            allowed += list(THRESHOLDING)
        raise ValueError(f"{m.name} does not take options {unknown}; valid: {allowed}")
    return THRESHOLDING | thresh


def prior(schedule: Schedule, rng, shape, dtype=jnp.float32):
    """x_T ~ N(0, s^2 I) at t_max: s = 1 for VP and flow (as diffusers), sigma_max for VE."""
    scale = 1.0 if schedule.family in ("vp", "flow") else schedule.sigma(schedule.t_max)
    return (scale * jax.random.normal(rng, shape)).astype(dtype)


def sample(
    denoise_fn,
    x_T,
    schedule: Schedule,
    *,
    method: str,
    num_steps: int,
    rng=None,
    grid=None,
    return_info: bool = False,
    **options,
):
    """Integrate from x_T at grid[0] to the data end of the grid with the named method.

    grid: None (the method's default grid name), a grid name from GRIDS, or an explicit decreasing
    array of num_steps + 1 times (see grids.time_grid for t_start / t_end / rho options).
    return_info: return (x_0, info), info = {"nfe": int32 denoiser calls} (dpm_adaptive adds
    "steps", "n_accept", "n_reject").
    """
    m = get(method)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    options = dict(options)
    thresh = _check_options(m, options)
    if grid is None or isinstance(grid, str):
        ts = time_grid(schedule, grid or m.default_grid, num_steps)
    else:
        ts = check_grid(grid)
        if ts.shape[0] != num_steps + 1:
            raise ValueError(
                f"grid has {ts.shape[0]} times; num_steps={num_steps} needs {num_steps + 1}"
            )
    if m.stochastic and rng is None:
        raise ValueError(f"{method} is stochastic: pass rng=jax.random.key(...)")
    if thresh["thresholding"]:
        ratio, max_value = thresh["dynamic_thresholding_ratio"], thresh["sample_max_value"]
        den = denoise_fn
        denoise_fn = lambda x, t: dynamic_threshold(den(x, t), ratio, max_value)
    out = m.run(denoise_fn, x_T, schedule, ts, rng=rng, **options)
    if not return_info:
        return out[0] if m.adaptive else out
    if m.adaptive:
        return out
    return out, {"nfe": jnp.asarray(nfe(method, num_steps, grid=ts, **options), jnp.int32)}


def nfe(method: str, num_steps: int, *, grid=None, **options) -> int:
    """Exact number of denoiser evaluations `sample` makes for these arguments.

    A few methods (singlestep DPM-Solver with intermediate="logsnr", the ancestral / SDE
    singlestep samplers) take a first-order step, one NFE less, when the grid ends at t = 0: as the
    named grids do. Pass an explicit `grid` array ending at t > 0 to count that case (a traced
    grid is assumed to end at 0). dpm_adaptive chooses its steps: use sample(return_info=True).
    """
    m = get(method)
    options = dict(options)
    _check_options(m, options)
    if "order" in options:
        check_order(method, options["order"], m.orders)
    if m.adaptive:
        raise ValueError(
            f"{method} chooses its steps adaptively; its NFE is known after the run: "
            "sample(..., return_info=True) returns (x_0, info) with info['nfe']"
        )
    zero_end = True
    if grid is not None and not isinstance(grid, str) and not isinstance(grid, jax.core.Tracer):
        zero_end = bool(np.asarray(grid)[-1] == 0.0)
    return m.nfe(num_steps, ends_at_zero=zero_end, **options)
