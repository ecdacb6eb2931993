"""Latent against pixel diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", sec. 4.1, Fig. 6 and 7): quality against training compute on shapes.

    python -m experiments.reproduce --config configs/reproduce/latent_vs_pixel.py \\
        --config.workdirs.ldm_unet=/tmp/shapes_ldm_unet \\
        --config.workdirs.ldm_mmdit=/tmp/shapes_ldm_mmdit \\
        --config.workdirs.pixel_mmdit=/tmp/shapes_mmdit --workdir /tmp/reproduce

The workdirs are training runs of configs/shapes_ldm_unet.py and configs/shapes_ldm_mmdit.py
(latent, on the shapes VAE) and configs/shapes_mmdit_flow.py (pixel). Each run given a workdir is
measured now (every kept checkpoint through the judge: minutes per checkpoint) and its curve
written to the claim workdir as <run>_curve.json, with the date and the run's workdir. A run
without one is read from `curves`: by default the curves of the runs in benchmarks/results/
shapes_* that an earlier run of this claim measured and exported to
benchmarks/results/reproduce/latent_vs_pixel/ (those runs take an hour or more each on 2 CPU
cores, so quick.py reads them rather than retraining; the report names each curve's source). A
run with neither is skipped, and with no latent or no pixel run the claim reports "not run".
Paper: with the same training steps, latent models (downsampling f = 4-16) reach far better FID
than pixel-space diffusion (f = 1): "a significant FID gap of 38 between pixel-based diffusion
(LDM-1) and LDM-8 after 2M training steps" (sec. 4.1, Fig. 6), at a fraction of the compute
per sample (Fig. 7).
Here: every kept checkpoint of each run scored by the shapes judge (experiments/eval_text2img:
full-prompt adherence and FD in judge features, the run's sampler and guidance) against the
training compute to that step: 3 x (network forward + text-encoder forward FLOPs per example, XLA
cost analysis) x batch size x steps (a backward pass costs about two forwards; the VAE encode is
paid once for the latent cache and left out), and the FLOPs per generated image
(eval_text2img.flops_per_sample: prompt encoding, NFE guided network calls, VAE decode).
Held means: at the largest training compute both a latent and the pixel run reached, the best
latent run's adherence (interpolated along its curve) is higher than the pixel run's.
`:runlocal` (tests): no workdirs and no curves, so the claim reports "not run".
"""

from configs import common
from configs.reproduce import base

CURVES = "benchmarks/results/reproduce/latent_vs_pixel"  # the committed curves (see above)


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    c = base.claim(
        "latent_vs_pixel", v.runlocal, "Latent vs pixel diffusion: quality against compute",
        "FID gap of 38 between pixel diffusion (LDM-1) and LDM-8 after 2M steps (sec. 4.1, "
        "Fig. 6); latent models need far less compute per sample (Fig. 7)",
        "at equal training compute the best latent run's judge adherence is above the pixel run's",
        "32x32 shapes with a 16x16x4 latent (f = 2), runs of a few thousand steps, scored by a "
        "judge trained here rather than FID",
    )  # fmt: skip
    c.workdirs = {"ldm_unet": "", "ldm_mmdit": "", "pixel_mmdit": ""}
    c.curves = {} if v.runlocal else {k: f"{CURVES}/{k}_curve.json" for k in c.workdirs}
    c.latent = ("ldm_unet", "ldm_mmdit")
    c.pixel = ("pixel_mmdit",)
    c.num_per_prompt = 4
    return c
