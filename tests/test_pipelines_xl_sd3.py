"""SDXL and SD3 pipelines vs diffusers (StableDiffusionXLPipeline, StableDiffusion3Pipeline with
and without T5) on tiny random-weight folders: same prompts, negative prompts, latents and the
folder's scheduler (Euler "leading" for SDXL, FlowMatchEuler shift 3 for SD3); images to max
abs diff <= 2e-3 at guidance 1 and 5. Also the prompt assembly itself against diffusers'
encode_prompt (SDXL's zeroed negative, SD3's padded CLIP + T5 / zero states)."""

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_fixtures import T5_LEN, sd3_folder, sd3_no_t5_folder, sdxl_folder  # noqa: F401

from diffusion import pipelines

PROMPTS = ["a photo of a cat", "a red dog on the cube"]
NEGATIVE = ["blue ball", "the cat"]
TOL = 2e-3
LATENTS = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _check(got, want, label):
    diff = float(np.abs(got - want).max())
    print(f"{label}: max abs diff {diff:.2e}")
    assert got.shape == want.shape and diff <= TOL, (label, diff)


def _compare(ref, ours, label, **extra):
    outs = []
    for scale in (1.0, 5.0):
        negative = NEGATIVE if scale > 1 else None
        kw = dict(negative_prompt=negative, height=16, width=16, guidance_scale=scale, **extra)
        want = ref(PROMPTS, num_inference_steps=3, latents=_nchw(LATENTS), output_type="np",
                   **kw).images  # fmt: skip
        got = ours.text_to_image(PROMPTS, num_steps=3, latents=LATENTS, **kw)
        _check(got, want, f"{label} guidance {scale}")
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 20 * TOL  # guidance changes the images


def test_sdxl_matches_diffusers(sdxl_folder):  # noqa: F811
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ours = pipelines.load(sdxl_folder)
    assert isinstance(ours, pipelines.StableDiffusionXLPipeline)
    assert ours.scheduler.method == "euler" and ours.text_encoder_2 is not None
    # prompt assembly, incl. the zeroed negative (force_zeros_for_empty_prompt) and time ids
    with torch.no_grad():
        want = ref.encode_prompt(PROMPTS, negative_prompt=None, do_classifier_free_guidance=True)
    cond, uncond = ours.encode_prompt(PROMPTS, height=16, width=16)
    np.testing.assert_allclose(cond["encoder_hidden_states"], want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["text_embeds"], want[2].numpy(), atol=1e-5)
    assert not np.any(uncond["encoder_hidden_states"]) and not np.any(uncond["text_embeds"])
    np.testing.assert_array_equal(cond["time_ids"], [[16, 16, 0, 0, 16, 16]] * 2)
    _compare(ref, ours, "SDXL")


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_matches_diffusers(sd3_folder, sd3_no_t5_folder, with_t5):  # noqa: F811
    path = sd3_folder if with_t5 else sd3_no_t5_folder
    absent = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(path, **absent)
    ref.set_progress_bar_config(disable=True)
    ours = pipelines.load(path)
    assert isinstance(ours, pipelines.StableDiffusion3Pipeline)
    assert (ours.text_encoder_3 is not None) == with_t5
    with torch.no_grad():
        want = ref.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                 max_sequence_length=T5_LEN)  # fmt: skip
    cond, _ = ours.encode_prompt(PROMPTS, guided=False, max_sequence_length=T5_LEN)
    states = cond["encoder_hidden_states"]  # (B, 16 CLIP + 12 T5 tokens, 80)
    assert states.shape == (2, 16 + T5_LEN, 80)
    np.testing.assert_allclose(states, want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["pooled_projections"], want[2].numpy(), atol=1e-5)
    assert not np.any(states[:, :16, 64:])  # CLIP-L + CLIG-G (64 wide) zero-padded to 80
    assert np.any(states[:, 16:]) == with_t5  # T5 states, or zeros without T5
    _compare(ref, ours, f"SD3 {'with' if with_t5 else 'without'} T5",
             max_sequence_length=T5_LEN)  # fmt: skip
