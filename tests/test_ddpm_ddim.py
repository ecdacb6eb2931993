"""DDPM and DDIM against diffusers' DDPMScheduler / DDIMScheduler, and DDPM on an exact GMM.

Both sides are driven by the same deterministic model function of (x, timestep) (a tanh of a
linear map, in numpy/torch and in jax) from the same x_T and the same injected noise; final
samples agree to 1e-4 relative. We run in float64 (diffusers keeps float32 alpha tables).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _reference import TanhNet
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from diffusion import analytic, metrics, predictions, samplers, schedules

B, D, N_TRAIN = 4, 3, 1000
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NET = TanhNet(B, D)
model_torch, model_jax, X_T = NET.torch, NET.jax, NET.x_T


def grid_from_timesteps(scheduler, final_t):
    """Our grid: diffusers timestep k sits at t = (k + 1) / N; then the final time."""
    k = scheduler.timesteps.numpy().astype(np.float64)
    return np.concatenate([(k + 1.0) / N_TRAIN, [final_t]])


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def schedule():
    return schedules.get("scaled_linear")


@pytest.fixture(scope="module")
def ours(x64, schedule):
    """jit(run) per (method, prediction_type, options); ts and noises are traced arguments."""
    cache = {}

    def run(method, pred, ts, noises=None, **opts):
        key = (method, pred, noises is None, tuple(sorted(opts.items())))
        if key not in cache:
            den = predictions.as_denoiser(model_jax, schedule, pred)
            run_fn = samplers.get(method).run
            cache[key] = jax.jit(
                lambda x, ts, noises: run_fn(den, x, schedule, ts, rng=None, noises=noises, **opts)
            )
        noises = None if noises is None else jnp.asarray(noises)
        out = cache[key](jnp.asarray(X_T), jnp.asarray(ts), noises)
        return np.asarray(out)

    return run


@pytest.mark.parametrize(
    "variance,spacing,pred",
    [
        ("fixed_small", "leading", "epsilon"),
        ("fixed_small", "linspace", "v_prediction"),
        ("fixed_large", "leading", "epsilon"),
        ("fixed_large", "linspace", "v_prediction"),
    ],
)
def test_ddpm_matches_diffusers(ours, monkeypatch, variance, spacing, pred):
    n = 10
    noises = np.random.RandomState(1).randn(n, B, D)
    sched = DDPMScheduler(
        **SD_BETAS,
        variance_type=variance,
        clip_sample=False,
        prediction_type=pred,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(n)
    calls = iter(range(n))
    monkeypatch.setattr(
        scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.from_numpy(noises[next(calls)])
    )
    x = torch.from_numpy(X_T)
    for t in sched.timesteps:
        x = sched.step(model_torch(x, t), t, x).prev_sample
    got = ours("ddpm", pred, grid_from_timesteps(sched, 0.0), noises, variance=variance)
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "eta,spacing,offset,alpha_to_one,pred",
    [
        (0.0, "leading", 0, True, "epsilon"),
        (0.0, "leading", 1, False, "v_prediction"),
        (0.0, "trailing", 0, True, "v_prediction"),
        (0.0, "trailing", 0, False, "epsilon"),
        (0.7, "leading", 1, False, "epsilon"),
        (0.7, "trailing", 0, True, "v_prediction"),
    ],
)
def test_ddim_matches_diffusers(ours, schedule, eta, spacing, offset, alpha_to_one, pred):
    n = 8
    noises = np.random.RandomState(2).randn(n, B, D)
    sched = DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=alpha_to_one,
        steps_offset=offset,
        prediction_type=pred,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(n)
    x = torch.from_numpy(X_T)
    for i, t in enumerate(sched.timesteps):
        noise = torch.from_numpy(noises[i]) if eta > 0 else None
        x = sched.step(model_torch(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    # set_alpha_to_one=False: the last step goes to alphas_cumprod[0], i.e. timestep 0, t = 1/N.
    ts = grid_from_timesteps(sched, 0.0 if alpha_to_one else 1.0 / N_TRAIN)
    if alpha_to_one:  # our named grid is the same as diffusers' spacing
        named = samplers.time_grid(schedule, spacing, n, steps_offset=offset)
        np.testing.assert_allclose(np.asarray(named), ts, rtol=1e-12)
    got = ours("ddim", pred, ts, noises if eta > 0 else None, eta=eta)
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-5)


def test_ddim_eta1_is_ddpm_fixed_small(ours):
    """Song et al. 2021: eta = 1 gives the DDPM posterior variance (same noise, same samples)."""
    ts = np.concatenate([np.linspace(1.0, 0.05, 6), [0.0]])
    noises = np.random.RandomState(3).randn(6, B, D)
    a = ours("ddim", "epsilon", ts, noises, eta=1.0)
    b = ours("ddpm", "epsilon", ts, noises, variance="fixed_small")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def gmm_setup(x64):
    """Exact 8-mode GMM samples, the exact-vs-exact sliced W2 baseline, and a runner."""
    gmm, n = analytic.make_gmm("gmm2d"), 2000
    ref = gmm.sample(jax.random.key(10), n)

    def sw(x):
        return float(metrics.sliced_wasserstein(x, ref, jax.random.key(13)))

    def run(schedule_name, method, num_steps, **opts):
        schedule = schedules.get(schedule_name)
        x_T = samplers.prior(schedule, jax.random.key(12), (n, 2), jnp.float64)
        den = lambda x, t: gmm.denoise(x, t, schedule)
        out = samplers.sample(
            den, x_T, schedule, method=method, num_steps=num_steps, rng=jax.random.key(1), **opts
        )
        assert np.all(np.isfinite(np.asarray(out)))
        return sw(out)

    return run, sw(gmm.sample(jax.random.key(11), n))


@pytest.mark.parametrize(
    "schedule_name,method,opts",
    [
        ("linear", "ddpm", {"variance": "fixed_small"}),
        ("linear", "ddpm", {"variance": "fixed_large"}),
        ("linear", "ddim", {"eta": 1.0}),
        ("rectified_flow", "ddpm", {"variance": "fixed_small"}),
    ],
)
def test_stochastic_samplers_match_gmm(gmm_setup, schedule_name, method, opts):
    """Sliced W2 to exact samples is close to the exact-vs-exact baseline at high NFE
    (VP table, and the general Gaussian posterior on a flow schedule)."""
    run, baseline = gmm_setup
    got = run(schedule_name, method, 200, **opts)
    assert got < 1.5 * baseline + 0.01, (got, baseline)


def test_gmm_metric_detects_a_bad_sampler(gmm_setup):
    """The check above can fail: DDPM with 3 steps (fixed_large) is visibly off."""
    run, baseline = gmm_setup
    got = run("linear", "ddpm", 3, variance="fixed_large")
    assert got > 2.0 * baseline, (got, baseline)


def test_bad_options():
    sch = schedules.get("linear")
    x = jnp.zeros((2, 2))
    den = lambda x, t: x
    with pytest.raises(ValueError, match="unknown variance"):
        samplers.sample(
            den, x, sch, method="ddpm", num_steps=2, rng=jax.random.key(0), variance="learned"
        )
    with pytest.raises(ValueError, match="stochastic"):
        samplers.sample(den, x, sch, method="ddim", num_steps=2, eta=0.5)
    with pytest.raises(ValueError, match="noises has shape"):
        samplers.sample(
            den, x, sch, method="ddim", num_steps=2, eta=0.5, noises=jnp.zeros((3, 2, 2))
        )
