"""Min-SNR weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy"): quality against training steps, min-SNR-5 against the plain eps objective.

    python -m experiments.reproduce --config configs/reproduce/min_snr.py --workdir /tmp/reproduce

Paper: weighting the loss by min(SNR(t), gamma) (gamma = 5, converted to the prediction target's
units) converges 3.4x faster than the plain objective (abstract; ImageNet 256 with ViT and
U-Net backbones, FID against training iterations).
Here: the eps digits model and the same model with min-SNR-5 weighting (configs/reproduce/base.py:
eps, eps_min_snr), trained for `steps` with 8 kept checkpoints each; every checkpoint sampled with
DPM-Solver++(2M) at `nfe`, guidance `guidance`; FD in digits-classifier features and class
accuracy against training step. The speed-up is the plain run's final step over the (linearly
interpolated) step at which the min-SNR run first reaches the plain run's final FD.
Held means: the speed-up is above 1 (min-SNR reaches the plain objective's final quality in fewer
steps); the paper's 3.4x is reported next to ours.
`:runlocal` (tests): tiny models, two checkpoints.
"""

from configs import common
from configs.reproduce import base


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",), steps=2000)
    c = base.claim(
        "min_snr", v.runlocal, "Min-SNR-5 weighting: quality against training steps",
        "min-SNR-5 converges 3.4x faster than the plain objective (ImageNet 256)",
        "min-SNR-5 reaches the plain objective's final FD in fewer training steps (speed-up > 1)",
        base.DIGITS_CAVEAT,
    )  # fmt: skip
    c.models = {
        "plain": base.digits_model("eps", steps=v.steps, runlocal=v.runlocal),
        "min_snr_5": base.digits_model("eps_min_snr", steps=v.steps, runlocal=v.runlocal),
    }
    c.method = "dpmpp_2m"
    c.nfe = 20
    c.guidance = 1.0
    c.paper_numbers = {"speedup": 3.4}
    if v.runlocal:
        c.nfe = 3
    return c
