"""Probability-flow ODE solvers (euler, heun, midpoint, rk4), and NFE of every method in
ddpm.py / ddim.py / flow.py.

- Parity with diffusers' EulerDiscreteScheduler, HeunDiscreteScheduler (eps and v) and
  FlowMatchEulerDiscreteScheduler (flow prediction, shift 3), same model function, same x_T,
  final samples to 1e-4 relative (float64 on our side; diffusers' Euler/Heun step in float32).
- Convergence on a single Gaussian (closed-form ODE map, float64, grid ending at t_end > 0).
- NFE: denoiser calls counted at run time equal samplers.nfe.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _reference import TanhNet
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler

from diffusion import analytic, metrics, predictions, samplers, schedules

B, D, N_TRAIN = 4, 3, 1000
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NET = TanhNet(B, D)
model_torch, model_jax, Z = NET.torch, NET.jax, NET.x_T


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def _ours(method, schedule, pred, x_T, ts):
    den = predictions.as_denoiser(model_jax, schedule, pred)
    out = samplers.sample(
        den, jnp.asarray(x_T), schedule, method=method, num_steps=len(ts) - 1, grid=jnp.asarray(ts)
    )
    return np.asarray(out)


def _diffusers_loop(sched, x):
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model_torch(inp, t)
        x = sched.step(out.float(), t, x).prev_sample
    return x.double().numpy()


@pytest.mark.parametrize(
    "cls,method,pred,spacing",
    [
        (EulerDiscreteScheduler, "euler", "epsilon", "trailing"),
        (EulerDiscreteScheduler, "euler", "v_prediction", "leading"),
        (HeunDiscreteScheduler, "heun", "epsilon", "leading"),
        (HeunDiscreteScheduler, "heun", "v_prediction", "trailing"),
    ],
)
def test_vp_ode_solvers_match_diffusers(x64, cls, method, pred, spacing):
    """k-diffusion-style schedulers integrate in x / alpha, sigma / alpha, as we do for VP."""
    n = 6
    schedule = schedules.get("scaled_linear")
    sched = cls(**SD_BETAS, prediction_type=pred, timestep_spacing=spacing)
    sched.set_timesteps(n)
    k = sched.timesteps.numpy().astype(np.float64)
    k = k if method == "euler" else k[::2]  # Heun repeats every timestep but the first
    ts = np.concatenate([np.asarray(schedule.t_from_timestep(k)), [0.0]])
    # Same grid in sigma / alpha as diffusers (integer timesteps: table values; diffusers builds
    # its alphas_cumprod in float32, hence 1e-4).
    ratio = np.exp(-np.asarray(schedule.logsnr(jnp.asarray(ts))))
    sig = sched.sigmas.numpy()
    sig = sig if method == "euler" else np.concatenate([sig[:-1:2], sig[-1:]])
    np.testing.assert_allclose(ratio, sig, rtol=1e-4)
    x_tilde = torch.from_numpy(Z).float() * sched.init_noise_sigma  # diffusers' state x / alpha
    want = _diffusers_loop(sched, x_tilde)
    x_T = x_tilde.double().numpy() / np.sqrt(1.0 + ratio[0] ** 2)  # our state x = alpha x~
    np.testing.assert_allclose(_ours(method, schedule, pred, x_T, ts), want, rtol=1e-4, atol=1e-5)


def test_flow_euler_matches_flowmatch(x64):
    """SD3 flow matching: grid from scheduler.sigmas (diffusers shifts the shifted sigma_min)."""
    n = 7
    schedule = schedules.get("rectified_flow", shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    sig = sched.sigmas.numpy().astype(np.float64)
    ts = np.concatenate([np.asarray(schedule.t_from_sigma(jnp.asarray(sig[:-1]))), [0.0]])
    np.testing.assert_allclose(
        1000 * np.asarray(schedule.sigma(jnp.asarray(ts[:-1]))), sched.timesteps.numpy(), rtol=1e-5
    )
    want = _diffusers_loop(sched, torch.from_numpy(Z).float())
    got = _ours("euler", schedule, "flow_prediction", Z, ts)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ convergence (analytic)

# (method, coarse n, expected order). midpoint converges with order 3 on this problem: for a
# Gaussian the ODE is y' = g'(s) y with g = log sqrt(v + s^2), where the midpoint rule's
# leading error term cancels (a plain numpy midpoint on the same scalar ODE shows it too).
# ddim is checked on the flow schedule below (on VP it coincides with euler in x / alpha).
ORDERS = [("euler", 64, 1), ("heun", 32, 2), ("midpoint", 32, 3), ("rk4", 16, 4)]
SETUPS = {
    "vp_cosine": (lambda: schedules.get("vp_cosine"), "logsnr", 1e-3),
    "flow": (lambda: schedules.get("rectified_flow", shift=3.0), "uniform_t", 1e-3),
    "edm": (lambda: schedules.get("edm"), "karras", 0.002),
}


def _gaussian_error(name, method, n):
    make, grid, t_end = SETUPS[name]
    schedule = make()
    gauss = analytic.make_gmm("gaussian2d")
    x_T = samplers.prior(schedule, jax.random.key(0), (8, 2), jnp.float64)
    ts = samplers.time_grid(schedule, grid, n, t_end=t_end)
    den = lambda x, t: gauss.denoise(x, t, schedule)
    out = samplers.sample(den, x_T, schedule, method=method, num_steps=n, grid=ts)
    return float(jnp.max(jnp.abs(out - gauss.ode_map(x_T, ts[0], ts[-1], schedule))))


@pytest.mark.parametrize("method,n,order", ORDERS)
def test_convergence_order_vp(x64, method, n, order):
    e1, e2 = _gaussian_error("vp_cosine", method, n), _gaussian_error("vp_cosine", method, 2 * n)
    measured = np.log2(e1 / e2)
    assert abs(measured - order) < 0.2, (e1, e2, measured)


@pytest.mark.parametrize(
    "setup,method,n,order",
    [
        ("flow", "ddim", 64, 1),
        ("flow", "heun", 32, 2),
        ("flow", "rk4", 16, 4),
        ("edm", "rk4", 16, 4),
    ],
)
def test_convergence_other_families(x64, setup, method, n, order):
    e1, e2 = _gaussian_error(setup, method, n), _gaussian_error(setup, method, 2 * n)
    assert e2 < 0.05 and np.log2(e1 / e2) > order - 0.2, (e1, e2)


# ------------------------------------------------------------------------------ NFE


NFE_CASES = [
    ("ddpm", {"variance": "fixed_large"}, "linear"),
    ("ddim", {"eta": 0.5}, "rectified_flow"),
    ("euler", {"s_churn": 5.0}, "rectified_flow"),
    ("heun", {"s_churn": 5.0, "s_tmin": 0.05, "s_tmax": 50.0}, "linear"),
    ("midpoint", {}, "linear"),
    ("rk4", {}, "rectified_flow"),
]


@pytest.mark.parametrize("method,opts,schedule_name", NFE_CASES)
def test_nfe_is_exact(method, opts, schedule_name):
    schedule = schedules.get(schedule_name)
    calls = []

    def den(x, t):
        jax.debug.callback(lambda t: calls.append(float(t)), t)
        return 0.9 * x

    n = 3
    out = samplers.sample(
        den, jnp.ones((2, 2)), schedule, method=method, num_steps=n, rng=jax.random.key(0), **opts
    )
    jax.block_until_ready(out)
    assert np.all(np.isfinite(np.asarray(out)))
    assert len(calls) == samplers.nfe(method, n, **opts), calls
    assert min(calls) > 0  # the denoiser is never evaluated at sigma = 0


def test_heun_churn_samples_gmm(x64):
    """EDM Algorithm 2 (stochastic Heun) on an exact GMM denoiser: distribution matches."""
    gmm, schedule, n = analytic.make_gmm("gmm2d"), schedules.get("edm"), 4000
    ref = gmm.sample(jax.random.key(10), n)
    x_T = samplers.prior(schedule, jax.random.key(12), (n, 2), jnp.float64)
    out = samplers.sample(
        lambda x, t: gmm.denoise(x, t, schedule),
        x_T,
        schedule,
        method="heun",
        num_steps=64,
        grid="karras",
        rng=jax.random.key(1),
        s_churn=10.0,
        s_tmin=0.05,
        s_tmax=50.0,
    )
    sw = lambda x: float(metrics.sliced_wasserstein(x, ref, jax.random.key(13)))
    baseline = sw(gmm.sample(jax.random.key(11), n))
    assert sw(out) < 1.5 * baseline + 0.01, (sw(out), baseline)
