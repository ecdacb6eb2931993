"""Samplers: pure functions over a denoiser, one compiled `lax.scan` loop per run.

    x0 = sample(denoise_fn, x_T, schedule, method="dpmpp_2m", num_steps=20)

`denoise_fn(x_t, t) -> x0_hat` (see predictions.as_denoiser and guidance.py); x_T is the state at
the grid's first time (draw it with `prior`; sample() never rescales it). `sample` is traceable:
wrap it in `jax.jit` with the static arguments, as the benchmark does. `SAMPLERS` lists the
methods; `nfe(method, num_steps, **options)` is the exact number of denoiser calls.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from diffusion.samplers import ddim, ddpm, dpm_multistep, dpm_singlestep, flow, unipc
from diffusion.samplers.base import Method, check_order
from diffusion.samplers.grids import GRIDS, check_grid, time_grid
from diffusion.schedules import Schedule

SAMPLERS: dict[str, Method] = {
    **ddpm.METHODS,
    **ddim.METHODS,
    **dpm_singlestep.METHODS,
    **dpm_multistep.METHODS,
    **unipc.METHODS,
    **flow.METHODS,
}

__all__ = ["GRIDS", "SAMPLERS", "Method", "check_grid", "get", "nfe", "prior", "sample"]
__all__ += ["time_grid"]


def get(method: str) -> Method:
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[method]


def _check_options(m: Method, options: dict):
    params = inspect.signature(m.run).parameters
    allowed = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k != "rng"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{m.name} does not take options {unknown}; valid: {allowed}")


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
    **options,
):
    """Integrate from x_T at grid[0] to the data end of the grid with the named method.

    grid: None (the method's default grid name), a grid name from GRIDS, or an explicit decreasing
    array of num_steps + 1 times (see grids.time_grid for t_start / t_end / rho options).
    """
    m = get(method)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    _check_options(m, options)
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
    return m.run(denoise_fn, x_T, schedule, ts, rng=rng, **options)


def nfe(method: str, num_steps: int, **options) -> int:
    """Exact number of denoiser evaluations `sample` makes for these arguments."""
    m = get(method)
    _check_options(m, options)
    if "order" in options:
        check_order(method, options["order"], m.orders)
    return m.nfe(num_steps, **options)
