"""pipelines.schedulers: every diffusers scheduler class and timestep spacing maps to the same
timesteps, sigmas, grid and initial-noise scale as diffusers' own `set_timesteps` (no models),
and to the intended sampler method and options. Methods with no other pipeline test (PNDM with
and without PRK, LMS, DEIS, thresholded DPM-Solver++, and the stochastic euler_ancestral,
sde-dpmsolver++, DPM-SDE and LCM with diffusers' noise injected) run the tiny SD1 pipeline
against diffusers' StableDiffusionPipeline: same config, latents and noise, images to max abs
diff <= 2e-3 (test_pipeline_matches_diffusers).
"""

import warnings

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_fixtures import SD_SCHEDULER, sd_folder  # noqa: F401
from _reference import NoiseRecorder
from diffusers.schedulers import scheduling_dpmsolver_sde

from diffusion import pipelines, samplers
from diffusion.pipelines import schedulers

pytestmark = pytest.mark.filterwarnings("ignore:Should have t")  # torchsde float32 interval ends
SD = SD_SCHEDULER
SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]
CASES = [
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True)),
    ("DDPMScheduler", dict(clip_sample=False)),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
    ("PNDMScheduler", dict(skip_prk_steps=False)),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("DPMSolverSDEScheduler", {}),
    ("DPMSolverSDEScheduler", dict(use_karras_sigmas=True)),
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", dict(solver_order=3)),
    ("LCMScheduler", {}),  # LCM ignores timestep_spacing (tested once)
    ("LCMScheduler", dict(original_inference_steps=20)),
]
TWO_STAGE = ("HeunDiscreteScheduler", "DPMSolverSDEScheduler")  # timesteps / sigmas repeated


def _config(sched):
    return {**sched.config, "_class_name": type(sched).__name__}


def _spec(sched):
    return schedulers.from_config(_config(sched))


def _reference_steps(sched):
    """diffusers' timesteps, once per step (PNDM: its base timesteps, before the PRK / PLMS
    repeats; two-stage schedulers: the first stage)."""
    name = type(sched).__name__
    if name == "PNDMScheduler":
        return sched._timesteps[::-1].astype(np.float64)
    k = sched.timesteps.double().numpy()
    return k[::2] if name in TWO_STAGE else k


def _reference_sigmas(sched):
    """diffusers' sigmas as sigma / alpha (DDIM-family schedulers keep alphas_cumprod)."""
    if hasattr(sched, "sigmas"):
        sig = sched.sigmas.double().numpy()
        if type(sched).__name__ in TWO_STAGE:  # repeats every sigma but the ends
            sig = np.concatenate([sig[:-1:2], sig[-1:]])
        return sig
    acp = sched.alphas_cumprod.double().numpy()
    k = _reference_steps(sched).astype(int)
    final = getattr(sched, "final_alpha_cumprod", 1.0)
    final = 1.0 if type(sched).__name__ in ("DDPMScheduler", "LCMScheduler") else float(final)
    a = np.concatenate([acp[k], [final]])
    return np.sqrt((1 - a) / a)


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_grids_match_diffusers(name, kw, spacing, offset):
    if (
        name in ("DPMSolverMultistepScheduler", "DPMSolverSDEScheduler")
        and kw
        and (spacing != "linspace")
    ):
        pytest.skip("one spacing is enough for Karras sigmas")
    if name == "LCMScheduler" and spacing != "leading":
        pytest.skip("LCM's timesteps do not depend on timestep_spacing")
    n = 7
    sched = getattr(diffusers, name)(**SD, **kw, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    spec = _spec(sched)
    steps, sigmas = spec.timesteps_and_sigmas(n)
    want_sig = _reference_sigmas(sched)
    if "karras" not in str(kw):
        np.testing.assert_allclose(steps, _reference_steps(sched), rtol=0, atol=1e-3)
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


THRESHOLD = {"thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.5}
MAPPING = [  # (class, config, method, options it must have); none of them warns
    ("PNDMScheduler", dict(skip_prk_steps=True), "plms", {}),
    ("PNDMScheduler", {}, "pndm", {}),
    ("LMSDiscreteScheduler", {}, "lms", {"order": 4}),
    ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", {"eta": 1.0}),
    ("DEISMultistepScheduler", {}, "deis", {"order": 2, "lower_order_final": True}),
    ("DEISMultistepScheduler", dict(solver_order=3, lower_order_final=False), "deis",
     {"order": 3, "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1.5),
     "dpmpp_multistep", THRESHOLD),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", thresholding=True,
     sample_max_value=1.5, lower_order_final=False), "sde_dpmpp_2m",
     {**THRESHOLD, "lower_order_final": False}),
    ("DPMSolverSinglestepScheduler", dict(thresholding=True, sample_max_value=1.5),
     "dpmpp_singlestep", THRESHOLD),
    ("DPMSolverSDEScheduler", {}, "dpmpp_sde", {}),
    ("LCMScheduler", dict(timestep_scaling=5.0), "lcm", {"timestep_scaling": 5.0}),
]  # fmt: skip


@pytest.mark.parametrize("name,kw,method,options", MAPPING)
def test_mapping(name, kw, method, options):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        spec = _spec(getattr(diffusers, name)(**SD, **kw))
    assert spec.method == method
    assert dict(spec.options) | options == dict(spec.options), (spec.options, options)


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", thresholding=True,
         final_sigmas_type="sigma_min"), "thresholding=True"),  # noise prediction: not a denoiser wrapper in our samplers
        ("DEISMultistepScheduler", dict(thresholding=True), "thresholding=True"),
        ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3),
         "order 3 is not implemented: using sde_dpmpp_2m"),
    ],
)  # fmt: skip
def test_unsupported_options_warn(name, kw, match):
    with pytest.warns(UserWarning, match=match):
        spec = _spec(getattr(diffusers, name)(**SD, **kw))
    assert "thresholding" not in dict(spec.options)


def test_unknown_scheduler_lists_supported():
    with pytest.raises(ValueError, match="supported: .*DDIMScheduler"):
        schedulers.from_config({"_class_name": "TCDScheduler"})


# --------------------------------------------------------------- the SD1 pipeline vs diffusers

PROMPT = ["a photo of a cat"]
LATENTS = np.random.RandomState(2).randn(1, 8, 8, 4).astype(np.float32)
TOL = 2e-3
SD1 = dict(**SD, steps_offset=1)
PNDM, DPM = "PNDMScheduler", "DPMSolverMultistepScheduler"
E2E = [  # (our method, diffusers class, config, num_steps, the closest other scheduler)
    ("pndm", PNDM, dict(skip_prk_steps=False), 5, (PNDM, dict(skip_prk_steps=True))),
    ("plms", PNDM, dict(skip_prk_steps=True), 5, (PNDM, {})),  # SD1 folders' scheduler
    ("lms", "LMSDiscreteScheduler", {}, 5, ("EulerDiscreteScheduler", {})),  # LMS order 1
    ("deis", "DEISMultistepScheduler", dict(solver_order=3), 5,  # vs the former fallback
     (DPM, dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"))),
    ("dpmpp_multistep", DPM, dict(thresholding=True, sample_max_value=1.5), 4, (DPM, {})),
    # stochastic: the other is the same scheduler with other noise
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, 4, None),
    ("sde_dpmpp_2m", DPM, dict(algorithm_type="sde-dpmsolver++"), 4, None),
    ("dpmpp_sde", "DPMSolverSDEScheduler", dict(noise_sampler_seed=0), 3,
     ("DPMSolverSDEScheduler", dict(noise_sampler_seed=1))),
    ("lcm", "LCMScheduler", {}, 4, None),
]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(sd_folder):  # noqa: F811
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    return ref, pipelines.load(sd_folder)


def _diffusers(loaded, sched, n, seed, monkeypatch):
    """diffusers' images and the normals its scheduler drew, NHWC: (n, 1, h, w, C) from the
    torch generator, or (n, 2, 1, h, w, C) from DPMSolverSDE's Brownian tree (recorded)."""
    recorders = []
    if isinstance(sched, diffusers.DPMSolverSDEScheduler):
        tree = scheduling_dpmsolver_sde.BrownianTreeNoiseSampler
        record = lambda *a: recorders.append(NoiseRecorder(tree(*a))) or recorders[-1]
        monkeypatch.setattr(scheduling_dpmsolver_sde, "BrownianTreeNoiseSampler", record)
    pipe = diffusers.StableDiffusionPipeline(**{**loaded[0].components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=n, latents=torch.from_numpy(
        LATENTS.transpose(0, 3, 1, 2).copy()), guidance_scale=1.0, height=16, width=16,
        output_type="np", generator=torch.Generator().manual_seed(seed)).images  # fmt: skip
    if recorders:
        return images, recorders[0].per_step(n, 2).transpose(0, 1, 2, 4, 5, 3)
    g = torch.Generator().manual_seed(seed)  # the same draws: latents are given, so the
    draws = [torch.randn((1, 4, 8, 8), generator=g).numpy() for _ in range(n)]  # scheduler's
    return images, np.stack(draws).transpose(0, 1, 3, 4, 2)


@pytest.mark.parametrize("method,name,kw,n,other", E2E, ids=[c[0] for c in E2E])
def test_pipeline_matches_diffusers(loaded, monkeypatch, method, name, kw, n, other):
    sched = getattr(diffusers, name)(**SD1, **kw)
    want, noises = _diffusers(loaded, sched, n, 0, monkeypatch)
    ours = loaded[1].with_scheduler(_config(sched))
    assert ours.scheduler.method == method
    got = ours.text_to_image(
        PROMPT, num_steps=n, latents=LATENTS, guidance_scale=1.0, height=16, width=16,
        sampler_noises=noises if samplers.get(method).stochastic else None,
    )  # fmt: skip
    diff = float(np.abs(got - want).max())
    # The mapping can fail: the closest other scheduler (or other noise) gives other images.
    other = getattr(diffusers, other[0])(**SD1, **other[1]) if other else sched
    apart = float(np.abs(got - _diffusers(loaded, other, n, 1, monkeypatch)[0]).max())
    label = f"{method} {kw} ({n} steps)"
    print(f"{label}: max abs diff {diff:.1e}; {apart:.1e} from {type(other).__name__}")
    assert got.shape == want.shape == (1, 16, 16, 3)
    assert diff <= TOL, (method, diff)
    assert apart > 2 * TOL, (method, apart)
