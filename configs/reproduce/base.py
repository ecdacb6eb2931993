"""Shared pieces of the reproduction configs (not a claim): the digits models they train, the
evaluation settings and the claim-config skeleton.

Models are configs/digits_unet_eps.py-sized class-conditional U-Nets on 8x8 digits, trained on one
device with EMA warmup (so that early checkpoints of the min-SNR curve are not dominated by the
initial weights); each kind changes only the objective:

    eps          eps-prediction, DDPM cosine table (configs/digits_unet_eps.py)
    flow         rectified flow, velocity, logit-normal(0, 1) times (configs/digits_unet_flow.py;
                 SD3's rf/lognorm(0.00, 1.00))
    eps_linear   eps-prediction, LDM's scaled-linear table (SD3's eps/linear)
    v_cosine     v-prediction, cosine table (SD3's v/cos)
    rf_uniform   rectified flow, uniform times (SD3's rf)
    rf_mode      rectified flow, mode sampling with scale 1.29 (SD3's rf/mode(1.29))
    eps_min_snr  eps-prediction, cosine table, min-SNR-5 loss weight (Hang et al. 2023)

experiments/reproduce.py trains each distinct config once under <models_dir>/<name>-<hash>/ and
reuses it on reruns and across claims. `runlocal` models are tiny (4 steps, no attention): they
exercise the code in the tests, their numbers mean nothing.
"""

import ml_collections

from configs import digits_unet_eps

KINDS = ("eps", "flow", "eps_linear", "v_cosine", "rf_uniform", "rf_mode", "eps_min_snr")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1, "num_devices": 1}


def tiny_unet():
    u = digits_unet_eps.unet(channels=(16, 16))
    u["down_block_types"], u["up_block_types"] = ["DownBlock2D"] * 2, ["UpBlock2D"] * 2
    return u


def digits_model(kind: str, *, steps: int = 2000, runlocal: bool = False):
    """The training config of one digits model kind (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {list(KINDS)}")
    rf = kind in ("flow", "rf_uniform", "rf_mode")
    c = digits_unet_eps.get_config("flow" if rf else None)
    c.name = f"digits_{kind}"
    if kind == "eps_linear":
        c.schedule = {"name": "scaled_linear", "kwargs": {}}
    elif kind == "v_cosine":
        c.objective.prediction_type = "v"
    elif kind == "rf_uniform":
        c.objective.time_density = "uniform"
    elif kind == "rf_mode":
        c.objective.time_density = "mode"
        c.objective.mode_scale = 1.29
    elif kind == "eps_min_snr":
        c.objective.weighting = "min_snr"
        c.objective.min_snr_gamma = 5.0
    c.ema_warmup = True
    c.mesh = dict(ONE_DEVICE)
    c.total_steps = steps
    c.ckpt_every = max(steps // 8, 1)  # 8 checkpoints, all kept: the min-SNR curve reads them
    c.keep_checkpoints = None
    c.log_every = max(steps // 40, 1)
    c.sample.every = steps
    if runlocal:
        c.model.config = tiny_unet()
        c.data.batch_size = 16
        c.total_steps, c.ckpt_every, c.log_every, c.sample.every = 4, 2, 2, 0
        c.optim.warmup_steps = 1
    return c


def evaluation(runlocal: bool = False):
    """Sweep settings every claim samples with (configs/sweep_samplers.py keys)."""
    return ml_collections.ConfigDict({
        "num_per_class": 3 if runlocal else 30,  # 300 samples: the size of the real test split
        "bootstrap": 3 if runlocal else 20,
        "seed": 0,
        "classifier": "benchmarks/results/digits_classifier",
        "judge": "benchmarks/results/shapes_judge",
    })  # fmt: skip


def claim(name: str, runlocal: bool, title: str, paper: str, held_means: str, caveat: str):
    """The skeleton every claim config fills: which claim, where models are cached (default
    <workdir>/models), the data directory, evaluation settings and the paper's statement."""
    c = ml_collections.ConfigDict()
    c.claim = name
    c.title = title
    c.paper = paper  # the published numbers, quoted in the report
    c.held_means = held_means  # what "held" means here
    c.caveat = caveat  # why a result on 8x8 digits may differ from the paper's
    c.models_dir = ""
    c.data_dir = ""
    c.runlocal = runlocal
    c.eval = evaluation(runlocal)
    return c


DIGITS_CAVEAT = (
    "8x8 digits, a small U-Net trained for a few thousand steps and 300 samples scored in a "
    "128-d classifier feature space are far from CIFAR-10 / ImageNet with FID on 50k samples"
)
