"""Sampling time grids: decreasing arrays of num_steps + 1 times from t_start to t_end.

Default t_end = 0 (clean data), the convention of diffusers and k-diffusion: num_steps points are
spaced between t_start and the schedule's t_min in the grid's own space, and a final step goes to
t = 0 (sigma = 0). With t_end > 0 (DPM-Solver's convention, e.g. t_end = schedule.t_min), all
num_steps + 1 points are spaced between t_start and t_end.

    uniform_t   uniform in t                                  (DPM-Solver "time_uniform")
    linspace    uniform in t, on the table for discrete schedules  (diffusers "linspace": DDIM,
                DDPM, PNDM; the k-diffusion-style schedulers interpolate fractional timesteps)
    linspace_multistep  diffusers' multistep "linspace" (DPMSolverMultistep, UniPC, DEIS):
                round(linspace(0, N - 1, n + 1))[::-1][:-1], unlike DDIM's (discrete schedules)
    leading     diffusers "leading" timestep spacing (discrete schedules)
    trailing    diffusers "trailing" timestep spacing, Lin et al. 2024 (discrete schedules)
    lcm         LCMScheduler's: n of the `original_inference_steps` (50) distillation timesteps
                k * (N // original) - 1, evenly spaced in index (Luo et al. 2023; discrete)
    logsnr      uniform in lambda = log(alpha / sigma)         (Lu et al. 2022)
                (logsnr and karras start at t_max - t_min on flow schedules, where lambda(1) = -inf)
    quadratic   uniform in sqrt(t)                              (DPM-Solver "time_quadratic")
    karras      sigma/alpha spaced with exponent rho (Karras et al. 2022, eq. 5; rho = 7)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.schedules import Schedule


def _spaced(schedule, name, n, t0, t1, rho):
    """n points (n >= 1) from t0 down to t1 in the grid's space, as a float64 numpy array."""
    if n == 1:
        return np.array([t0])
    if name in ("uniform_t", "linspace"):
        return np.linspace(t0, t1, n)
    if name == "quadratic":
        return np.linspace(np.sqrt(t0), np.sqrt(t1), n) ** 2
    if name == "logsnr":
        lam = np.linspace(float(schedule.logsnr(t0)), float(schedule.logsnr(t1)), n)
        return np.asarray(schedule.t_from_logsnr(jnp.asarray(lam)), np.float64)
    if name == "karras":
        s0 = float(jnp.exp(-schedule.logsnr(t0))) ** (1.0 / rho)
        s1 = float(jnp.exp(-schedule.logsnr(t1))) ** (1.0 / rho)
        sig = np.linspace(s0, s1, n) ** rho
        return np.asarray(schedule.t_from_sigma_ratio(jnp.asarray(sig)), np.float64)
    raise AssertionError(name)


def _diffusers_timesteps(name, num_steps, n_train, steps_offset, original_steps):
    """diffusers' integer timesteps (DDIMScheduler / DPMSolverMultistepScheduler / LCMScheduler
    .set_timesteps), decreasing."""
    if name == "linspace":
        return np.linspace(0, n_train - 1, num_steps).round()[::-1]
    if name == "linspace_multistep":
        return np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1]
    if name == "lcm":
        if not num_steps <= original_steps <= n_train:
            raise ValueError(
                f"grid 'lcm' takes num_steps <= original_inference_steps <= num_train_timesteps; "
                f"got {num_steps}, {original_steps}, {n_train}"
            )
        origin = (np.arange(1, original_steps + 1) * (n_train // original_steps) - 1)[::-1]
        return origin[
            np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(int)
        ]
    if name == "leading":
        ratio = n_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1] + steps_offset
    ratio = n_train / num_steps  # trailing
    return np.round(np.arange(n_train, 0, -ratio)) - 1


GRIDS = ("uniform_t", "linspace", "linspace_multistep", "leading", "trailing", "lcm", "logsnr")
GRIDS += ("quadratic", "karras")
DIFFUSERS_ONLY = ("linspace_multistep", "leading", "trailing", "lcm")  # discrete schedules only


def time_grid(
    schedule: Schedule,
    name: str,
    num_steps: int,
    *,
    t_start: float | None = None,
    t_end: float = 0.0,
    rho: float = 7.0,
    steps_offset: int = 0,
    original_inference_steps: int = 50,
):
    """The (num_steps + 1,) decreasing float32/64 grid of the given name (see module docstring).

    diffusers' spacings on discrete schedules end at t_end, default 0; t_end = schedule.t_min is
    diffusers' final_sigmas_type="sigma_min" (DEIS's end). Computed eagerly on the host even
    inside `jax.jit` (grids are compile-time constants).
    """
    with jax.ensure_compile_time_eval():
        args = (t_start, t_end, rho, steps_offset, original_inference_steps)
        return _time_grid(schedule, name, num_steps, *args)


def _time_grid(schedule, name, num_steps, t_start, t_end, rho, steps_offset, original_steps):
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; valid: {list(GRIDS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t0 = float(schedule.t_max if t_start is None else t_start)
    if t_start is None and name in ("logsnr", "karras") and schedule.family == "flow":
        # lambda(1) = -inf for flow; start one training step inside, as diffusers' flow sigmas
        t0 = schedule.t_max - schedule.t_min
    discrete = hasattr(schedule, "t_from_timestep")
    if name in DIFFUSERS_ONLY or (name == "linspace" and discrete):
        if not discrete:
            raise ValueError(f"grid {name!r} needs a discrete (DDPM-table) schedule")
        n_train = schedule.num_train_timesteps
        k = _diffusers_timesteps(name, num_steps, n_train, steps_offset, original_steps)
        ts = (k + 1.0) / n_train
        if t_start is not None or not 0 <= t_end < ts[-1]:
            raise ValueError(
                f"grid {name!r} follows diffusers: no t_start, and 0 <= t_end < {ts[-1]} (its "
                f"last timestep); got t_start={t_start}, t_end={t_end}"
            )
        ts = np.concatenate([ts, [t_end]])
    elif t_end == 0:
        ts = np.concatenate([_spaced(schedule, name, num_steps, t0, schedule.t_min, rho), [0.0]])
    else:
        ts = _spaced(schedule, name, num_steps + 1, t0, float(t_end), rho)
    return check_grid(np.asarray(ts, np.float64))


def check_grid(ts):
    """Validate an explicit grid: 1-D, at least two points, strictly decreasing.

    Values can only be checked when concrete; a traced grid (built inside jit) is checked for
    shape only.
    """
    if isinstance(ts, jax.core.Tracer):
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"grid must be 1-D with >= 2 times, got shape {ts.shape}")
        return ts
    arr = np.asarray(ts, np.float64)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"grid must be 1-D with >= 2 times, got shape {arr.shape}")
    diffs = np.diff(arr)
    if not np.all(diffs < 0):
        bad = int(np.argmax(diffs >= 0))
        raise ValueError(
            f"grid must be strictly decreasing (noise -> data); ts[{bad}]={arr[bad]} "
            f"<= ts[{bad + 1}]={arr[bad + 1]}"
        )
    with jax.ensure_compile_time_eval():  # stays concrete inside jit (methods may need values)
        return jnp.asarray(arr, dtype=jnp.result_type(float))
