"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", sec. 4.1,
Table 1 and Fig. 4): the guidance scale trades diversity for fidelity.

    python -m experiments.reproduce --config configs/reproduce/cfg_guidance.py \\
        --workdir /tmp/reproduce

Paper (ImageNet 64x64 and 128x128): as the guidance strength grows, Inception score (fidelity)
rises monotonically while FID first falls (best at a small strength, w = 0.1-0.3, i.e. guidance
scale 1 + w = 1.1-1.3 in our convention pred_u + s (pred_c - pred_u)) and then rises: a
U-shaped FID, the trade-off of precision against recall.
Here: the eps and rectified-flow digits models, DPM-Solver++(2M) at `nfe`, each of
`guidance_scales`; precision, recall, class accuracy and FD in digits-classifier features.
Held means: from the smallest to the largest scale precision and class accuracy rise and recall
falls, and FD is smallest at an intermediate scale (U-shaped), for each model.
`:runlocal` (tests): tiny eps model, three scales.
"""

from configs import common
from configs.reproduce import base


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",), steps=2000)
    c = base.claim(
        "cfg_guidance", v.runlocal, "Classifier-free guidance: the guidance-scale sweep",
        "IS rises monotonically with guidance strength while FID is best at w = 0.1-0.3 (scale "
        "1.1-1.3) and then rises (ImageNet 64x64, Table 1 / Fig. 4)",
        "precision and class accuracy rise, recall falls, FD is U-shaped in the scale",
        base.DIGITS_CAVEAT,
    )  # fmt: skip
    c.models = {
        "eps": base.digits_model("eps", steps=v.steps, runlocal=v.runlocal),
        "flow": base.digits_model("flow", steps=v.steps, runlocal=v.runlocal),
    }
    c.method = "dpmpp_2m"
    c.nfe = 20
    c.guidance_scales = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 8.0)
    if v.runlocal:
        del c.models["flow"]
        c.nfe, c.guidance_scales = 3, (1.0, 2.0, 4.0)
    return c
