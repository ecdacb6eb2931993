"""Images of pipelines loaded from single files: ours (`load_single_file(file, config=folder)`)
vs diffusers' `from_single_file(file, config=folder)` on the same tiny SD1 (DDIM eps), SD2
(DDIM v-prediction) and SDXL (Euler leading) files: same prompts, negative prompts, latents
and the folder's scheduler, classifier-free guidance 4; images to max abs diff <= 2e-3 (the
tolerance of the folder pipelines' tests, test_pipelines_sd.py)."""

import warnings

import numpy as np
import pytest
import torch
from _single_file_fixtures import REFERENCE, sf_files, sf_folders  # noqa: F401

from diffusion import pipelines

PROMPTS = ["a photo of a cat", "a red dog on the cube"]
NEGATIVE = ["blue ball", "the cat"]
TOL = 2e-3
LATENTS = np.random.RandomState(2).randn(2, 8, 8, 4).astype(np.float32)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_images_match_diffusers_from_single_file(sf_folders, sf_files, arch):  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"add_watermarker": False} if arch == "sdxl" else {}
        ref = REFERENCE[arch].from_single_file(
            sf_files[arch], config=sf_folders[arch], local_files_only=True, **kw
        )
        ours = pipelines.load_single_file(sf_files[arch], config=sf_folders[arch])
    ref.set_progress_bar_config(disable=True)
    gen = dict(negative_prompt=NEGATIVE, height=16, width=16, guidance_scale=4.0)
    latents = torch.from_numpy(np.ascontiguousarray(LATENTS.transpose(0, 3, 1, 2)))
    want = ref(PROMPTS, num_inference_steps=3, latents=latents, output_type="np", **gen).images
    got = ours.text_to_image(PROMPTS, num_steps=3, latents=LATENTS, **gen)
    diff = float(np.abs(got - want).max())
    print(f"{arch}: images max abs diff {diff:.2e}, image std {want.std():.3f}")
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert diff <= TOL, (arch, diff)
    assert want.std() > 0.05  # not a constant image
