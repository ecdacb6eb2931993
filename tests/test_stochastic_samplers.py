"""Ancestral / SDE samplers and LCM: diffusers parity with injected noise, and distributions.

Parity (float64 here, float32 tables in diffusers; final samples to 1e-4 relative, NFE equal):
EulerAncestralDiscreteScheduler (euler_ancestral) and LCMScheduler (lcm) draw their noise with
`randn_tensor`, which we replace by our noises (NoiseFeed); DPMSolverSDEScheduler (dpmpp_sde)
draws from a torchsde Brownian tree, which we record (NoiseRecorder) and feed to ours. The
k-diffusion-style schedulers run in x / alpha (x_T = x~_T alpha_T, as test_flow_samplers.py).
DPMSolverMultistepScheduler's sde-dpmsolver++ parity (sde_dpmpp_2m, dpmpp_2m_sde) is in
test_dpm_solver_pp.py, k-diffusion's in test_k_diffusion.py.

Distribution: with their own noise (dpmpp_sde's correlated Brownian pair included), the stochastic
samplers at 100 steps reach the exact 8-mode GMM: sliced W2 to exact samples close to the
exact-vs-exact baseline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _reference import NoiseRecorder, TanhNet, diffusers_loop, rel_err
from diffusers import DPMSolverSDEScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
from diffusers.schedulers import (
    scheduling_dpmsolver_sde,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)

from diffusion import analytic, metrics, predictions, samplers, schedules

pytestmark = pytest.mark.filterwarnings("ignore:Should have t")  # torchsde float32 interval ends
B, D = 3, 4
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NET = TanhNet(B, D)
NOISES = np.random.RandomState(5).randn(12, B, D)


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def ours(method, schedule, pred, x_T, ts, noises, **opts):
    den = predictions.as_denoiser(NET.jax, schedule, pred)
    run = lambda x, z: samplers.sample(
        den, x, schedule, method=method, num_steps=len(ts) - 1, grid=ts, noises=z,
        rng=jax.random.key(0), return_info=True, **opts,
    )  # fmt: skip
    out, info = jax.jit(run)(jnp.asarray(x_T), jnp.asarray(noises))
    return np.asarray(out), int(info["nfe"])


# (diffusers class, config, our method, grid, num_steps, prediction type)
CASES = [
    (EulerAncestralDiscreteScheduler, dict(**SD), "euler_ancestral", "leading", 8, "epsilon"),
    (EulerAncestralDiscreteScheduler, {}, "euler_ancestral", "trailing", 6, "v_prediction"),
    (DPMSolverSDEScheduler, dict(**SD), "dpmpp_sde", "leading", 6, "epsilon"),
    (DPMSolverSDEScheduler, {}, "dpmpp_sde", "trailing", 5, "v_prediction"),
    (LCMScheduler, dict(**SD), "lcm", "lcm", 4, "epsilon"),
    (LCMScheduler, dict(original_inference_steps=20), "lcm", "lcm", 6, "v_prediction"),
]


@pytest.mark.parametrize(
    "cls,cfg,method,grid,n,pred", CASES, ids=[f"{c[2]}-{c[3]}-{c[5]}" for c in CASES]
)
def test_parity_diffusers(x64, monkeypatch, cls, cfg, method, grid, n, pred):
    spacing = "leading" if cls is LCMScheduler else grid
    sched = cls(prediction_type=pred, timestep_spacing=spacing, **cfg)
    sched.set_timesteps(n)
    schedule = schedules.from_diffusers_config(dict(sched.config))
    kw = (
        {"original_inference_steps": cfg["original_inference_steps"]}
        if "original_" in str(cfg)
        else {}
    )
    ts = np.asarray(samplers.time_grid(schedule, grid, n, **kw))
    k = np.asarray(sched.timesteps.numpy(), np.float64)[:: 2 if cls is DPMSolverSDEScheduler else 1]
    np.testing.assert_allclose(ts[:-1], np.asarray(schedule.t_from_timestep(k)), rtol=1e-12)
    x = torch.from_numpy(NET.x_T) * sched.init_noise_sigma
    module, noises = None, NOISES[:n]
    if cls is DPMSolverSDEScheduler:
        sigmas = sched.sigmas[sched.sigmas > 0]
        tree = scheduling_dpmsolver_sde.BrownianTreeNoiseSampler(x, sigmas.min(), sigmas.max(), 7)
        sched.noise_sampler = recorder = NoiseRecorder(tree)
        noises = None
    else:
        module = scheduling_lcm if cls is LCMScheduler else scheduling_euler_ancestral_discrete
    ref = diffusers_loop(sched, NET.torch, x, noises, module, monkeypatch)
    if cls is DPMSolverSDEScheduler:
        noises = recorder.per_step(n, 2)  # (n, 2, B, D)
    x_T = x.numpy() * (1.0 if cls is LCMScheduler else float(schedule.alpha(ts[0])))
    got, nfe = ours(method, schedule, pred, x_T, ts, noises)
    print(f"diffusers {cls.__name__} {cfg} {grid} {pred}: max rel err {rel_err(got, ref):.1e}")
    assert rel_err(got, ref) < 1e-4, rel_err(got, ref)
    assert nfe == len(sched.timesteps) == samplers.nfe(method, n)


@pytest.fixture(scope="module")
def gmm_setup(x64):
    gmm, n, schedule = analytic.make_gmm("gmm2d"), 2000, schedules.get("vp_linear")
    ref = gmm.sample(jax.random.key(10), n)
    x_T = samplers.prior(schedule, jax.random.key(12), (n, 2), jnp.float64)

    def sw(x):
        return float(metrics.sliced_wasserstein(x, ref, jax.random.key(13)))

    def run(method, num_steps):
        den = lambda x, t: gmm.denoise(x, t, schedule)
        out = samplers.sample(
            den, x_T, schedule, method=method, num_steps=num_steps, grid="logsnr",
            rng=jax.random.key(1),
        )  # fmt: skip
        return sw(out)

    return run, sw(gmm.sample(jax.random.key(11), n))


@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_sde", "dpmpp_3m_sde"])
def test_samples_match_gmm(gmm_setup, method):
    run, baseline = gmm_setup
    got = run(method, 100)
    assert got < 1.5 * baseline + 0.01, (got, baseline)


def test_gmm_metric_detects_a_bad_sampler(gmm_setup):
    """The check above can fail: euler_ancestral with 4 steps is visibly off."""
    run, baseline = gmm_setup
    got = run("euler_ancestral", 4)
    assert got > 2.0 * baseline, (got, baseline)
