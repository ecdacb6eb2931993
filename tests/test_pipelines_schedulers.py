"""pipelines.schedulers: every diffusers scheduler class and timestep spacing maps to the same
timesteps, sigmas, grid and initial-noise scale as diffusers' own `set_timesteps` (no models).
"""

import warnings

import diffusers
import numpy as np
import pytest
import torch

from diffusion import samplers
from diffusion.pipelines import schedulers

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]
CASES = [
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    ("DDPMScheduler", dict(clip_sample=False)),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
]


def _config(sched):
    return {**sched.config, "_class_name": type(sched).__name__}


def _spec(sched):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks for methods not in SAMPLERS yet
        return schedulers.from_config(_config(sched))


def _reference_sigmas(sched):
    """diffusers' sigmas as sigma / alpha (DDIM-family schedulers keep alphas_cumprod)."""
    if hasattr(sched, "sigmas"):
        sig = sched.sigmas.double().numpy()
        if type(sched).__name__ == "HeunDiscreteScheduler":  # repeats every sigma but the ends
            sig = np.concatenate([sig[:-1:2], sig[-1:]])
        return sig
    acp = sched.alphas_cumprod.double().numpy()
    k = sched.timesteps.numpy()
    k = np.unique(k)[::-1] if type(sched).__name__ == "PNDMScheduler" else k
    final = getattr(sched, "final_alpha_cumprod", 1.0)
    final = 1.0 if type(sched).__name__ == "DDPMScheduler" else float(final)
    a = np.concatenate([acp[k], [final]])
    return np.sqrt((1 - a) / a)


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_grids_match_diffusers(name, kw, spacing, offset):
    if name == "DPMSolverMultistepScheduler" and kw and spacing != "linspace":
        pytest.skip("one spacing is enough for Karras sigmas")
    n = 7
    sched = getattr(diffusers, name)(**SD, **kw, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    spec = _spec(sched)
    steps, sigmas = spec.timesteps_and_sigmas(n)
    want_sig = _reference_sigmas(sched)
    if name != "PNDMScheduler" and "karras" not in str(kw):
        want_steps = sched.timesteps.double().numpy()
        want_steps = want_steps[::2] if name.startswith("Heun") else want_steps
        np.testing.assert_allclose(steps, want_steps, rtol=0, atol=1e-3)
    # diffusers computes its tables in float32
    np.testing.assert_allclose(sigmas, want_sig, rtol=2e-5, atol=1e-7)
    ts = spec.grid(n)
    ratio = np.exp(-np.asarray([spec._logsnr(t) for t in ts]))
    distinct = want_sig[np.concatenate([[True], np.diff(want_sig) < 0])]  # DDIM k=0 -> k=0
    np.testing.assert_allclose(ratio, distinct, rtol=2e-5, atol=1e-7)
    # diffusers' model input at t_0 is scale_model_input(latents * init_noise_sigma): our x_T
    first = sched.timesteps[0]
    scaled = sched.scale_model_input(torch.ones(1), first) if hasattr(sched, "sigmas") else 1.0
    want = float(sched.init_noise_sigma) * float(scaled)
    assert abs(spec.init_scale(ts) - want) < 1e-5, (spec.init_scale(ts), want)


@pytest.mark.parametrize("n", [1, 4, 28])
def test_flow_match_grid(n):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    spec = schedulers.from_config(_config(sched))
    assert (spec.method, spec.prediction_type, spec.family) == ("euler", "velocity", "flow")
    ts = spec.grid(n)
    np.testing.assert_allclose(
        spec.schedule.model_time(ts[:-1]), sched.timesteps.numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(spec.schedule.sigma(ts), sched.sigmas.numpy(), rtol=1e-5)


def test_methods_and_options_are_valid_sampler_calls():
    """Every mapped (method, options) is accepted by samplers.nfe (same option check as
    sample)."""
    for name in schedulers.SCHEDULERS:
        if name == "FlowMatchEulerDiscreteScheduler":
            continue
        sched = getattr(diffusers, name)(**SD)
        spec = _spec(sched)
        assert spec.method in samplers.SAMPLERS
        samplers.nfe(spec.method, 5, **dict(spec.options))
    cfg = _config(diffusers.DPMSolverMultistepScheduler(solver_order=3, solver_type="heun"))
    spec = schedulers.from_config(cfg)
    assert spec.method == "dpmpp_multistep"
    assert dict(spec.options)["order"] == 3 and dict(spec.options)["solver_type"] == "heun"
    spec = schedulers.from_config(_config(diffusers.UniPCMultistepScheduler(solver_type="bh1")))
    assert (spec.method, dict(spec.options)["variant"]) == ("unipc", "bh1")


def test_missing_method_falls_back_with_warning(monkeypatch):
    monkeypatch.delitem(samplers.SAMPLERS, "euler_ancestral", raising=False)
    cfg = _config(diffusers.EulerAncestralDiscreteScheduler(**SD))
    with pytest.warns(UserWarning, match="'euler_ancestral' is not available.*'ddim'"):
        spec = schedulers.from_config(cfg)
    assert spec.method == "ddim" and dict(spec.options) == {"eta": 1.0}


def test_unknown_scheduler_lists_supported():
    with pytest.raises(ValueError, match="supported: .*DDIMScheduler"):
        schedulers.from_config({"_class_name": "LCMScheduler"})
