"""SD 1/2 pipelines vs diffusers (StableDiffusionPipeline eps and v-prediction,
StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline with a 9-channel and a 4-channel
U-Net) on tiny random-weight folders: same prompts, negative prompts, scheduler, latents and
noise (the torch generator's draws fed to ours), images to max abs diff <= 2e-3 at guidance 1
and 5. Batch 2: ours runs sharded over 2 of the 8 fake devices."""

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_fixtures import SD_SCHEDULER, sd_folder, sd_inpaint_folder  # noqa: F401

from diffusion import pipelines

PROMPTS = ["a photo of a cat", "a red dog on the cube"]
NEGATIVE = ["blue ball", "the cat"]
TOL = 2e-3
RNG = np.random.RandomState(0)
LATENTS = RNG.randn(2, 8, 8, 4).astype(np.float32)
IMAGE = RNG.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
MASK = np.zeros((2, 16, 16, 1), np.float32)
MASK[0, 4:12, 2:10] = 1.0
MASK[1, :8] = 0.8  # binarized to 1


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _draws(seed, n):
    """The first n (2, 4, 8, 8) standard normal draws of diffusers' generator, NHWC."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((2, 4, 8, 8), generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(n)]


@pytest.fixture(scope="module")
def loaded(sd_folder, sd_inpaint_folder):  # noqa: F811
    """Each folder loaded once: (diffusers pipeline, ours) by U-Net input channels."""
    out = {}
    for channels, path in ((4, sd_folder), (9, sd_inpaint_folder)):
        ref = diffusers.StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False
        )
        out[channels] = (ref, pipelines.load(path))
    return out


def _pair(loaded, cls, scheduler, channels=4):
    """diffusers' `cls` on the loaded components and ours, both with `scheduler`."""
    ref, ours = loaded[channels]
    ref = cls(**{**ref.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    config = {**scheduler.config, "_class_name": type(scheduler).__name__}
    return ref, ours.with_scheduler(config)


def _check(got, want, label):
    diff = float(np.abs(got - want).max())
    print(f"{label}: max abs diff {diff:.2e}")
    assert got.shape == want.shape and got.dtype == np.float32
    assert diff <= TOL, (label, diff)


@pytest.mark.parametrize(
    "prediction,scheduler",
    [
        # linspace Euler: fractional timesteps, init_noise_sigma = sigma_max (x_T scaled)
        ("epsilon", diffusers.EulerDiscreteScheduler(**SD_SCHEDULER)),
        (
            "v_prediction",
            diffusers.DDIMScheduler(
                **SD_SCHEDULER,
                prediction_type="v_prediction",
                timestep_spacing="trailing",
                clip_sample=False,
                set_alpha_to_one=False,
            ),
        ),  # fmt: skip
    ],
)
def test_text_to_image_matches_diffusers(loaded, prediction, scheduler):
    scheduler.register_to_config(prediction_type=prediction)
    ref, ours = _pair(loaded, diffusers.StableDiffusionPipeline, scheduler)
    outs = []
    for scale, rescale in ((1.0, 0.0), (5.0, 0.7 if prediction == "v_prediction" else 0.0)):
        negative = NEGATIVE if scale > 1 else None
        kw = dict(negative_prompt=negative, height=16, width=16, guidance_scale=scale,
                  guidance_rescale=rescale)  # fmt: skip
        want = ref(PROMPTS, num_inference_steps=4, latents=_nchw(LATENTS), output_type="np",
                   **kw).images  # fmt: skip
        got = ours.text_to_image(PROMPTS, num_steps=4, latents=LATENTS, **kw)
        _check(got, want, f"SD {prediction} guidance {scale}")
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 20 * TOL  # guidance changes the images


def test_image_to_image_matches_diffusers(loaded):
    scheduler = diffusers.UniPCMultistepScheduler(**SD_SCHEDULER)
    ref, ours = _pair(loaded, diffusers.StableDiffusionImg2ImgPipeline, scheduler)
    for scale in (1.0, 5.0):
        negative = NEGATIVE if scale > 1 else None
        kw = dict(negative_prompt=negative, guidance_scale=scale, strength=0.6)
        want = ref(PROMPTS, image=IMAGE, num_inference_steps=5, output_type="np",
                   generator=torch.Generator().manual_seed(3), **kw).images  # fmt: skip
        posterior, noise = _draws(3, 2)  # VAE posterior sample, then the added noise
        got = ours.image_to_image(PROMPTS, IMAGE, num_steps=5, image_noise=posterior,
                                  noise=noise, **kw)  # fmt: skip
        _check(got, want, f"SD img2img guidance {scale}")


@pytest.mark.parametrize("channels", [9, 4])
def test_inpaint_matches_diffusers(loaded, channels):
    scheduler = (  # known-region replacement is exact for multistep solvers too
        diffusers.DDIMScheduler(**SD_SCHEDULER, clip_sample=False, steps_offset=1)
        if channels == 9
        else diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULER)
    )
    ref, ours = _pair(loaded, diffusers.StableDiffusionInpaintPipeline, scheduler, channels)
    assert ours.inpaint_mode() == ("concat" if channels == 9 else "replace")
    for scale in (1.0, 5.0):
        negative = NEGATIVE if scale > 1 else None
        kw = dict(negative_prompt=negative, guidance_scale=scale)
        want = ref(PROMPTS, image=IMAGE, mask_image=MASK, num_inference_steps=4, output_type="np",
                   latents=_nchw(LATENTS), generator=torch.Generator().manual_seed(4),
                   **kw).images  # fmt: skip
        # 9 channels: one posterior draw (masked image); 4: image, then masked image (unused)
        draws = _draws(4, 2)
        extra = (dict(masked_image_noise=draws[0]) if channels == 9
                 else dict(image_noise=draws[0]))  # fmt: skip
        got = ours.inpaint(PROMPTS, IMAGE, MASK, num_steps=4, latents=LATENTS, **extra, **kw)
        _check(got, want, f"SD inpaint {channels}-channel guidance {scale}")
