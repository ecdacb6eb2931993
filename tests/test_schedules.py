"""Noise schedules against diffusers' tables, DPM-Solver's closed forms (re-derived in numpy here)
and SD3's timestep shift (diffusers FlowMatchEulerDiscreteScheduler)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffusion import schedules

DISCRETE = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Our defaults per table (diffusers' DDPMScheduler defaults to 1e-4 / 0.02 for every table; the
# scaled_linear default here is Stable Diffusion's).
BETAS = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (1e-4, 0.02),
}


def _all_schedules():
    """One instance per registry entry, plus non-default parameters."""
    out = {name: schedules.get(name) for name in schedules.SCHEDULES}
    out["rectified_flow_shift3"] = schedules.get("rectified_flow", shift=3.0)
    out["linear_n100"] = schedules.get("linear", num_train_timesteps=100)
    return out


ALL = _all_schedules()


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_tables_match_diffusers(name):
    b0, b1 = BETAS[name]
    ref = DDPMScheduler(beta_schedule=name, beta_start=b0, beta_end=b1).alphas_cumprod
    ref = ref.double().numpy()
    ours = schedules.get(name).alphas_cumprod
    assert ours.shape == ref.shape == (1000,)
    # diffusers accumulates its cumprod in float32.
    np.testing.assert_allclose(ours, ref, rtol=2e-5)


def test_discrete_custom_betas_match_diffusers():
    ref = DDPMScheduler(num_train_timesteps=200, beta_start=2e-4, beta_end=0.03)
    ours = schedules.get("linear", num_train_timesteps=200, beta_start=2e-4, beta_end=0.03)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-5)


@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_timesteps_hit_the_table(name):
    s = schedules.get(name)
    k = np.array([0, 1, 17, 500, 998, 999])
    with jax.enable_x64(True):
        t = s.t_from_timestep(k)
        np.testing.assert_allclose(s.alpha(t) ** 2, s.alphas_cumprod[k], rtol=1e-12)
        np.testing.assert_allclose(s.model_time(t), k, atol=1e-9)  # diffusers' timestep index


@pytest.mark.parametrize("name", sorted(ALL))
def test_logsnr_round_trip(name):
    s = ALL[name]
    with jax.enable_x64(True):
        t = jnp.linspace(s.t_min, s.t_max, 37)
        if s.family == "flow":
            t = t[:-1]  # alpha(t_max) = 0: logsnr = -inf has no unique inverse
        lam = s.logsnr(t)
        assert np.all(np.diff(np.asarray(lam)) < 0), "logsnr must decrease in t"
        np.testing.assert_allclose(s.t_from_logsnr(lam), t, rtol=1e-9, atol=1e-12)
        ratio = s.sigma(t) / s.alpha(t)
        np.testing.assert_allclose(s.t_from_sigma_ratio(ratio), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALL))
def test_clean_data_at_zero_and_family_identity(name):
    s = ALL[name]
    with jax.enable_x64(True):
        assert float(s.alpha(0.0)) == 1.0
        assert float(s.sigma(0.0)) == 0.0
        assert float(s.logsnr(0.0)) == math.inf
        t = jnp.linspace(s.t_min, s.t_max, 11)
        a, sig = s.alpha(t), s.sigma(t)
        if s.family == "vp":
            np.testing.assert_allclose(a**2 + sig**2, 1.0, rtol=1e-12)
        elif s.family == "flow":
            np.testing.assert_allclose(a + sig, 1.0, rtol=1e-12)
        else:
            assert s.family == "ve"
            np.testing.assert_allclose(a, 1.0)
        with np.errstate(divide="ignore"):  # flow: alpha(t_max) = 0, logsnr = -inf on both sides
            np.testing.assert_allclose(s.logsnr(t), np.log(a) - np.log(sig), rtol=1e-10)


def test_vp_linear_closed_form():
    """DPM-Solver NoiseScheduleVP('linear'): log alpha = -(b1 - b0) t^2 / 4 - b0 t / 2."""
    s = schedules.get("vp_linear")
    b0, b1 = 0.1, 20.0
    t = np.linspace(1e-3, 1.0, 25)
    log_alpha = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    sigma = np.sqrt(1.0 - np.exp(2.0 * log_alpha))
    with jax.enable_x64(True):
        np.testing.assert_allclose(s.alpha(t), np.exp(log_alpha), rtol=1e-12)
        np.testing.assert_allclose(s.sigma(t), sigma, rtol=1e-10)
        np.testing.assert_allclose(s.logsnr(t), log_alpha - np.log(sigma), rtol=1e-10)
        assert s.model_time(0.5) == 500.0


def test_vp_cosine_closed_form():
    """DPM-Solver NoiseScheduleVP('cosine'), s = 0.008, t_max = 0.9946."""
    s = schedules.get("vp_cosine")
    assert s.t_max == 0.9946
    t = np.linspace(1e-3, 0.9946, 25)

    def log_f(u):
        return np.log(np.cos((u + 0.008) / 1.008 * np.pi / 2.0))

    log_alpha = log_f(t) - log_f(0.0)
    lam = log_alpha - 0.5 * np.log(1.0 - np.exp(2.0 * log_alpha))
    with jax.enable_x64(True):
        np.testing.assert_allclose(s.alpha(t), np.exp(log_alpha), rtol=1e-12)
        np.testing.assert_allclose(s.logsnr(t), lam, rtol=1e-9)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_shift_matches_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(12)
    # diffusers' unshifted times before its shift (linspace between its sigma_max and sigma_min).
    u = np.linspace(ref.sigma_max, ref.sigma_min, 12)
    s = schedules.get("rectified_flow", shift=shift)
    with jax.enable_x64(True):
        np.testing.assert_allclose(s.sigma(u), ref.sigmas[:-1].double().numpy(), rtol=1e-6)
        np.testing.assert_allclose(s.model_time(u), ref.timesteps.double().numpy(), rtol=1e-6)
        sig = ref.sigmas.double().numpy()
        np.testing.assert_allclose(s.sigma(s.t_from_sigma(sig)), sig, rtol=1e-12, atol=1e-15)
        # SD3 convention: model time is 1000 * sigma.
        np.testing.assert_allclose(s.model_time(0.3), 1000.0 * s.sigma(0.3), rtol=1e-12)


def _saved_config(scheduler, path):
    """scheduler_config.json as written by save_pretrained (it carries `_class_name`)."""
    scheduler.save_config(path)
    return json.loads((path / "scheduler_config.json").read_text())


def test_from_diffusers_config(tmp_path):
    for name in DISCRETE:
        cfg = _saved_config(DDPMScheduler(beta_schedule=name, num_train_timesteps=500), tmp_path)
        s = schedules.from_diffusers_config(cfg)
        assert isinstance(s, schedules.DiscreteVP) and s.num_train_timesteps == 500
        ref = DDPMScheduler(beta_schedule=name, num_train_timesteps=500).alphas_cumprod
        np.testing.assert_allclose(s.alphas_cumprod, ref.double().numpy(), rtol=2e-5)
    cfg = _saved_config(FlowMatchEulerDiscreteScheduler(shift=3.0), tmp_path)
    s = schedules.from_diffusers_config(cfg)
    assert isinstance(s, schedules.RectifiedFlow) and s.shift == 3.0
    with pytest.raises(ValueError, match="dynamic"):
        schedules.from_diffusers_config(cfg | {"use_dynamic_shifting": True})
    ddpm = dict(DDPMScheduler().config)
    with pytest.raises(ValueError, match="trained_betas"):
        schedules.from_diffusers_config(ddpm | {"trained_betas": [0.1, 0.2]})


def test_zero_terminal_snr_matches_diffusers(tmp_path):
    """The rescaled table is diffusers' rescale_betas_zero_snr one; its last entry is 2**-24 as
    in DPMSolverMultistepScheduler (DDPMScheduler keeps 0), and sampling's first step sees
    pure noise to float precision."""
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ddpm = DDPMScheduler(**kw, rescale_betas_zero_snr=True)
    s = schedules.from_diffusers_config(_saved_config(ddpm, tmp_path))
    assert s.zero_terminal_snr and s != schedules.get("scaled_linear")
    ref = ddpm.alphas_cumprod.double().numpy()
    assert ref[-1] == 0.0
    # diffusers computes its table in float32: 4e-7 absolute, 4e-5 relative at the noisy end
    np.testing.assert_allclose(s.alphas_cumprod[:-1], ref[:-1], rtol=1e-4, atol=1e-6)
    dpm = DPMSolverMultistepScheduler(**kw, rescale_betas_zero_snr=True).alphas_cumprod
    assert s.alphas_cumprod[-1] == float(dpm[-1]) == 2.0**-24
    plain = schedules.get("scaled_linear")
    assert float(plain.alpha(1.0)) > 0.06 and float(s.alpha(1.0)) < 3e-4
    np.testing.assert_allclose(s.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-12)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown schedule 'nope'.*scaled_linear"):
        schedules.get("nope")
    with pytest.raises(ValueError, match="unknown beta_schedule 'nope'.*squaredcos_cap_v2"):
        schedules.DiscreteVP(beta_schedule="nope")
    with pytest.raises(ValueError, match="shift"):
        schedules.get("rectified_flow", shift=0.0)


def test_schedules_are_hashable_static_args():
    s = schedules.get("scaled_linear")
    f = jax.jit(lambda t, s: s.alpha(t), static_argnums=1)
    np.testing.assert_allclose(f(0.5, s), s.alpha(0.5), rtol=1e-6)
    assert hash(s) == hash(schedules.get("scaled_linear"))
