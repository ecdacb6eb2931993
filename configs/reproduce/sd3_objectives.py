"""SD3 objectives and time densities (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", sec. 5.1, Table 1): train each variant for the same steps and
rank them as the paper does.

    python -m experiments.reproduce --config configs/reproduce/sd3_objectives.py \\
        --workdir /tmp/reproduce

Paper (Table 1, rank averaged over all control settings: datasets, metrics (CLIP score, FID),
sampling steps and guidance; lower is better): rf/lognorm(0.00, 1.00) 1.54 (best) and rf (uniform
t) 5.67 are the values the issue quotes; eps/linear 2.88, rf/mode(1.29) 2.75 and v/cos 9.17 are
our reading of the same table (check them against the paper before citing).
Here: five digits models (configs/reproduce/base.py: eps_linear, v_cosine, rf_uniform, flow =
rf/lognorm(0, 1), rf_mode) trained for `steps` each, sampled with DDIM (the first-order solver every
parameterisation shares; on rectified flow it is Euler) at each of `nfes` x `guidance_scales`;
per setting, each of FD in digits-classifier features and class accuracy ranks the variants
(1 = best); the average over settings and metrics is the variant's rank, as in Table 1 (also
reported over the fewest and the most steps, Table 1's other columns).
Held means: rf/lognorm(0, 1) has the best (lowest) average rank of the five and rf (uniform) a
worse one; we also report the Spearman correlation of our ranks with the paper's.
`:runlocal` (tests): tiny models, one setting.
"""

from configs import common
from configs.reproduce import base

VARIANTS = {  # our model kind -> the paper's name
    "eps_linear": "eps/linear",
    "v_cosine": "v/cos",
    "rf_uniform": "rf",
    "flow": "rf/lognorm(0.00, 1.00)",
    "rf_mode": "rf/mode(1.29)",
}
PAPER_RANK = {
    "eps_linear": 2.88,
    "v_cosine": 9.17,
    "rf_uniform": 5.67,
    "flow": 1.54,
    "rf_mode": 2.75,
}  # fmt: skip  (by our kind: ConfigDict keys take no dots)


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",), steps=1000)
    c = base.claim(
        "sd3_objectives", v.runlocal, "SD3: objectives and time densities ranked",
        "Table 1 average rank: rf/lognorm(0.00, 1.00) 1.54 (best), rf/mode(1.29) 2.75, "
        "eps/linear 2.88, rf 5.67, v/cos 9.17 (only 1.54 and 5.67 are quoted by the issue)",
        "rf/lognorm(0, 1) has the best average rank of the five variants and uniform rf a worse "
        "one",
        base.DIGITS_CAVEAT + "; five variants, not the paper's 61 runs",
    )  # fmt: skip
    c.models = {k: base.digits_model(k, steps=v.steps, runlocal=v.runlocal) for k in VARIANTS}
    c.variants = VARIANTS
    c.method = "ddim"
    c.nfes = (5, 10, 50)
    c.guidance_scales = (1.0, 2.0)
    c.paper_numbers = PAPER_RANK
    if v.runlocal:
        c.nfes, c.guidance_scales = (4,), (1.0,)
    return c
