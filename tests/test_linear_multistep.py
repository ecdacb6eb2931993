"""PNDM / PLMS, LMS and DEIS: diffusers parity and convergence orders on the exact Gaussian.

Parity: diffusers' PNDMScheduler with (pndm) and without (plms, skip_prk_steps=True) PRK warm-up,
LMSDiscreteScheduler (lms) and DEISMultistepScheduler (deis, orders 1-3) against our samplers,
driven by the same model function (TanhNet) from the same x_T, on our named grids (leading /
trailing / linspace_multistep, whose times are checked against the scheduler's timesteps);
final samples to 1e-4 relative (float64 here, float32 tables in diffusers).

Orders (exact Gaussian ODE map, float64): PLMS's Adams-Bashforth-4 has constant coefficients, so
it is fourth order on grids uniform in its variable sigma / alpha (EDM schedule, "karras" grid
with rho = 1, sigma 2 -> 0.05); LMS's variable-step coefficients allow any grid, but its first
step is Euler (k-diffusion's and diffusers' warm-up), whose O(h^2) local error makes LMS globally
second order: measured 3.94 (pndm), 3.96 (plms), 2.01 (lms) between 160 and 320 steps. DEIS on
the logSNR VP grid: 0.98, 1.96, 3.86 for orders 1, 2, 3 (40 -> 80 steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _reference import TanhNet, diffusers_loop, rel_err
from diffusers import DEISMultistepScheduler, LMSDiscreteScheduler, PNDMScheduler
from test_dpm_solver import empirical_order

from diffusion import analytic, predictions, samplers, schedules

B, D, N_TRAIN = 3, 4, 1000
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NET = TanhNet(B, D)


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def ours(method, schedule, pred, x_T, ts, **opts):
    den = predictions.as_denoiser(NET.jax, schedule, pred)
    run = lambda x: samplers.sample(
        den, x, schedule, method=method, num_steps=len(ts) - 1, grid=ts, return_info=True, **opts
    )
    out, info = jax.jit(run)(jnp.asarray(x_T))
    return np.asarray(out), int(info["nfe"])


# (diffusers class, config, our method, our options, grid, num_steps, prediction type, t_end)
# PNDM's default set_alpha_to_one=False ends at the table's first entry (t = t_min); with "leading"
# that is the last timestep itself (a zero-length final step), so those cases end at alpha = 1.
# PRK midpoints: diffusers' timestep k - (N // n) // 2, ours (t + t') / 2: equal when N / n is an
# even integer (n = 10, 5 here). v_prediction is left out for PNDM: diffusers' PNDM combines the raw v outputs of different
# steps and converts the combination with the current step's alpha, which is not PLMS on eps.
A1 = dict(set_alpha_to_one=True)
CASES = [
    (PNDMScheduler, dict(skip_prk_steps=False, **A1), "pndm", {}, "leading", 10, "epsilon", 0),
    (PNDMScheduler, dict(skip_prk_steps=False), "pndm", {}, "trailing", 5, "epsilon", "t_min"),
    (PNDMScheduler, dict(skip_prk_steps=True, **SD, **A1), "plms", {}, "leading", 10, "epsilon", 0),
    (PNDMScheduler, dict(skip_prk_steps=True), "plms", {}, "trailing", 8, "epsilon", "t_min"),
    (LMSDiscreteScheduler, dict(**SD), "lms", {}, "leading", 9, "epsilon", 0),
    (LMSDiscreteScheduler, {}, "lms", {}, "trailing", 7, "v_prediction", 0),
    (DEISMultistepScheduler, dict(solver_order=3, **SD), "deis", {}, "linspace_multistep", 9, "epsilon", "t_min"),
    (DEISMultistepScheduler, dict(solver_order=2), "deis", dict(order=2), "linspace_multistep", 8, "v_prediction", "t_min"),
    (DEISMultistepScheduler, dict(solver_order=1), "deis", dict(order=1), "linspace_multistep", 5, "epsilon", "t_min"),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls,cfg,method,opts,grid,n,pred,t_end", CASES, ids=[f"{c[2]}-{c[4]}-{c[6]}" for c in CASES]
)
def test_parity_diffusers(x64, cls, cfg, method, opts, grid, n, pred, t_end):
    sched = cls(prediction_type=pred, timestep_spacing=grid.split("_")[0], **cfg)
    sched.set_timesteps(n)
    schedule = schedules.from_diffusers_config(dict(sched.config))
    t_end = schedule.t_min if t_end == "t_min" else t_end
    ts = np.asarray(samplers.time_grid(schedule, grid, n, t_end=t_end))
    k = sched._timesteps[::-1] if cls is PNDMScheduler else sched.timesteps.numpy()  # no repeats
    k = np.asarray(k, np.float64)
    np.testing.assert_allclose(ts[:-1], np.asarray(schedule.t_from_timestep(k)), rtol=1e-12)
    x = (
        torch.from_numpy(NET.x_T) * sched.init_noise_sigma
    )  # k-diffusion-style schedulers: x / alpha
    ref = diffusers_loop(sched, NET.torch, x)
    alpha_T = float(schedule.alpha(ts[0]))
    x_T = x.numpy() * (alpha_T if cls is LMSDiscreteScheduler else 1.0)
    got, nfe = ours(method, schedule, pred, x_T, ts, **opts)
    print(f"diffusers {cls.__name__} {cfg} {grid} {pred}: max rel err {rel_err(got, ref):.1e}")
    assert rel_err(got, ref) < 1e-4, rel_err(got, ref)
    assert nfe == len(sched.timesteps) == samplers.nfe(method, n, grid=ts, **opts)


# ------------------------------------------------------------------ orders on the exact Gaussian

GAUSS, EDM = analytic.make_gmm("gaussian2d"), schedules.get("edm")


def edm_error(method, n):
    """Max error vs the exact ODE map on a grid uniform in sigma from 2 to 0.05 (EDM)."""
    ts = samplers.time_grid(EDM, "karras", n, t_start=2.0, t_end=0.05, rho=1.0)
    x_T = 2.0 * jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
    den = lambda x, t: GAUSS.denoise(x, t, EDM)
    out = samplers.sample(den, x_T, EDM, method=method, num_steps=n, grid=ts)
    return float(jnp.abs(out - GAUSS.ode_map(x_T, ts[0], ts[-1], EDM)).max())


@pytest.mark.parametrize(
    "method,lo,hi", [("pndm", 3.8, 4.2), ("plms", 3.8, 4.2), ("lms", 1.8, 2.2)]
)
def test_order_on_sigma_uniform_grid(x64, method, lo, hi):
    e1, e2 = edm_error(method, 160), edm_error(method, 320)
    assert lo < np.log2(e1 / e2) < hi, (e1, e2, np.log2(e1 / e2))


@pytest.mark.parametrize("order,lo,hi", [(1, 0.8, 1.2), (2, 1.8, 2.2), (3, 2.8, 4.2)])
def test_deis_orders(x64, order, lo, hi):
    measured, errs = empirical_order("deis", (40, 80), order=order, lower_order_final=False)
    assert lo < measured < hi, (measured, errs)
