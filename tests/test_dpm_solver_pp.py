"""DPM-Solver++ and SDE-DPM-Solver++: diffusers parity, exact-Gaussian convergence order, exact NFE.

Parity: diffusers' DPMSolverMultistepScheduler (dpmsolver++, sde-dpmsolver++ with the same
injected `variance_noise`) and DPMSolverSinglestepScheduler (dpmsolver++, our intermediate="grid")
on DDPM tables (eps and v prediction) and flow sigmas (flow_prediction, RectifiedFlow(shift)),
driven by the same model function and x_T; final samples agree to 1e-4 relative (float64 on our
side; diffusers keeps float32 sigmas). Convergence and NFE as in test_dpm_solver.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import Counter
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from test_dpm_solver import (
    X_T,
    count_default_grid,
    diffusers_run,
    empirical_order,
    gaussian_error,
    model_jax,
    ours,
    rel_err,
)

from diffusion import predictions, samplers, schedules
from diffusion.samplers.grids import time_grid


@pytest.fixture(scope="module")
def x64():
    with jax.enable_x64(True):
        yield


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
# (scheduler kind, diffusers config, our method, our options, num_steps)
PARITY = [
    ("multi", dict(solver_order=2, **SD), "dpmpp_2m", {}, 10),
    ("multi", dict(solver_order=3), "dpmpp_3m", {}, 16),
    (
        "multi",
        dict(solver_order=3, prediction_type="v_prediction"),
        "dpmpp_multistep",
        dict(order=3),
        6,
    ),
    (
        "multi",
        dict(
            solver_order=2, solver_type="heun", final_sigmas_type="sigma_min", euler_at_final=True
        ),
        "dpmpp_2m",
        dict(solver_type="heun", euler_at_final=True),
        16,
    ),
    (
        "multi",
        dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
        "dpmpp_3m",
        dict(lower_order_final=False),
        8,
    ),
    ("multi", dict(solver_order=2, **FLOW), "dpmpp_2m", {}, 10),
    # zero terminal SNR (Lin et al. 2024) with v and the trailing grid: the first step at t = 1
    (
        "multi",
        dict(
            solver_order=2,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            **SD,
        ),
        "dpmpp_2m",
        {},
        10,
    ),
    ("sde", dict(solver_order=2), "sde_dpmpp_2m", {}, 10),
    (
        "sde",
        dict(solver_order=2, solver_type="heun", prediction_type="v_prediction"),
        "sde_dpmpp_2m",
        dict(solver_type="heun"),
        8,
    ),
    # k-diffusion's dpmpp_2m_sde rules (no lower_order_final) at eta = 1 are diffusers' SDE 2M.
    ("sde", dict(solver_order=2, lower_order_final=False), "dpmpp_2m_sde", {}, 10),
    (
        "sde",
        dict(
            solver_order=2,
            solver_type="heun",
            lower_order_final=False,
            prediction_type="v_prediction",
        ),
        "dpmpp_2m_sde",
        dict(solver_type="heun"),
        8,
    ),
    ("single", dict(solver_order=3), "dpmpp_singlestep", dict(order=3), 9),
    (
        "single",
        dict(solver_order=3, solver_type="heun", prediction_type="v_prediction"),
        "dpmpp_singlestep",
        dict(order=3, solver_type="heun"),
        7,
    ),
    ("single", dict(solver_order=2, **FLOW), "dpmpp_2s", {}, 8),
]


@pytest.mark.parametrize("kind,cfg,method,opts,n", PARITY)
def test_parity_diffusers(x64, kind, cfg, method, opts, n):
    cfg = dict(cfg)
    pred = cfg.setdefault("prediction_type", "epsilon")
    if kind == "single":
        sched = DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++", **cfg)
        opts = dict(opts, intermediate="grid")
    else:
        alg = "sde-dpmsolver++" if kind == "sde" else "dpmsolver++"
        sched = DPMSolverMultistepScheduler(algorithm_type=alg, **cfg)
    noises = np.random.RandomState(1).randn(n, *X_T.shape) if kind == "sde" else None
    flow = cfg.get("use_flow_sigmas", False)
    ref, ts = diffusers_run(sched, n, flow=flow, noises=noises)
    if flow:
        schedule = schedules.RectifiedFlow(shift=cfg["flow_shift"])
    else:
        schedule = schedules.from_diffusers_config(dict(sched.config))
    counter = Counter()
    out = ours(method, schedule, pred, ts, noises=noises, counter=counter, **opts)
    print(f"diffusers {kind} {cfg} {method} {opts}: max rel err {rel_err(out, ref):.1e}")
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
    assert counter.n == n == samplers.nfe(method, n, **opts)


# --------------------------------------------------------------------------- exact Gaussian

CONVERGENCE = [
    ("dpmpp_2s", {}, (20, 40, 80), 2),
    ("dpmpp_singlestep", dict(order=3), (40, 80, 160), 3),
    ("dpmpp_2m", dict(lower_order_final=False), (40, 80, 160), 2),
    # diffusers' (= Lu's code's) 3M halves the h^3 term: globally second order (dpm_multistep).
    ("dpmpp_3m", dict(lower_order_final=False), (40, 80, 160), 2),
]


@pytest.mark.parametrize("method,opts,steps,theory", CONVERGENCE)
def test_convergence_order_gaussian(x64, method, opts, steps, theory):
    order, errs = empirical_order(method, steps, **opts)
    assert abs(order - theory) < 0.2, (order, errs)


def test_dpmpp1_equals_dpm_solver1(x64):
    """DPM-Solver++1 and DPM-Solver-1 are both DDIM: same error (the latter's order is measured in
    test_dpm_solver.py)."""
    a = gaussian_error("dpmpp_singlestep", 40, order=1)
    b = gaussian_error("dpm_solver", 40, order=1)
    assert abs(a - b) < 1e-6 * b


def test_taylor_3m_is_at_least_third_order(x64):
    """third_order="taylor" (D2 doubled) is third order: measured slope ~4 here (>= 2.8 asserted;
    the leading h^3 term is small for this Gaussian), and far more accurate than diffusers' 3M."""
    order, errs = empirical_order(
        "dpmpp_3m", (20, 40, 80), lower_order_final=False, third_order="taylor"
    )
    assert order > 2.8, (order, errs)
    assert errs[-1] < 0.1 * gaussian_error("dpmpp_3m", 80, lower_order_final=False)


# --------------------------------------------------------------------------- NFE, t = 0 end


@pytest.mark.parametrize(
    "method,n,opts",
    [("dpmpp_2s", 3, {})],
)
def test_nfe_and_finite_on_default_grid(x64, method, n, opts):
    """Grids ending at t = 0: counted calls == samplers.nfe, output finite (no inf * 0)."""
    calls, out = count_default_grid(method, n, **opts)
    assert calls == samplers.nfe(method, n, **opts)
    assert np.all(np.isfinite(out))


def test_sde_noise_from_rng(x64):
    """Without `noises`, step i draws N(0, I) from fold_in(rng, i): same key, same sample."""
    schedule = schedules.get("linear")
    den = predictions.as_denoiser(model_jax, schedule, "epsilon")
    ts = time_grid(schedule, "linspace", 4)
    run = jax.jit(
        lambda x, rng, noises: samplers.get("sde_dpmpp_2m").run(
            den, x, schedule, ts, rng=rng, noises=noises
        )
    )
    run_rng = jax.jit(
        lambda x, rng: samplers.get("sde_dpmpp_2m").run(den, x, schedule, ts, rng=rng)
    )
    x = jnp.asarray(X_T)
    noises = jnp.stack(
        [jax.random.normal(jax.random.fold_in(jax.random.key(3), i), x.shape) for i in range(4)]
    )
    a = np.asarray(run_rng(x, jax.random.key(3)))
    c = np.asarray(run_rng(x, jax.random.key(4)))
    b = np.asarray(run(x, None, noises))
    assert rel_err(a, b) < 1e-12
    assert rel_err(a, c) > 1e-3


# --------------------------------------------------------------------------- thresholding


@pytest.mark.parametrize("method,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_thresholding_matches_diffusers_and_stays_in_range(x64, method, order):
    """Dynamic thresholding (Saharia et al. 2022) on TanhNet, whose x0_hat = (x - sigma eps) /
    alpha overshoots [-1, 1] at high noise: equal to diffusers' thresholded DPMSolverMultistep,
    the samples lie in [-1, 1], and without thresholding they do not (so the check can fail)."""
    cfg = dict(solver_order=order, thresholding=True, sample_max_value=1.5)
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **cfg)
    x_T = np.random.RandomState(4).randn(3, 2, 4)  # diffusers thresholds (B, C, ...) samples
    ref, ts = diffusers_run(sched, 10, x_T=x_T)
    schedule = schedules.from_diffusers_config(dict(sched.config))
    den = predictions.as_denoiser(model_jax, schedule, "epsilon")

    def run(**kw):
        fn = lambda x: samplers.sample(den, x, schedule, method=method, num_steps=10, grid=ts, **kw)
        return np.asarray(jax.jit(fn)(jnp.asarray(x_T)))

    out = run(thresholding=True, sample_max_value=1.5)
    print(f"diffusers thresholded {method}: max rel err {rel_err(out, ref):.1e}")
    assert rel_err(out, ref) < 1e-4, rel_err(out, ref)
    assert np.abs(out).max() <= 1.0 + 1e-12
    assert np.abs(run()).max() > 1.2
