"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", Table 1): the eta x steps table.

    python -m experiments.reproduce --config configs/reproduce/ddim.py --workdir /tmp/reproduce

Paper (CIFAR-10 FID, S = 10 / 20 / 50 / 100 steps of the 1000-step DDPM model):
    eta = 0.0   13.36 / 6.84 / 4.67 / 4.16
    eta = 0.2   14.04 / 7.11 / 4.77 / 4.25
    eta = 0.5   16.66 / 8.35 / 5.25 / 4.46
    eta = 1.0   41.07 / 18.36 / 8.01 / 5.78
    sigma-hat   367.43 / 133.37 / 32.72 / 9.99  (DDPM's larger variance beta_t)
    1000-step DDPM (sigma-hat): 3.17
Here: the eps digits model (configs/reproduce/base.py) sampled without guidance by DDIM at each
eta and S (`ddim:eta=...`, diffusers' linspace grid), by DDPM with the larger variance
(`ddpm:variance=fixed_large`, the sigma-hat row) at each S and at ddpm_steps; FD in
digits-classifier features, precision / recall and class accuracy of 300 samples.
Held means: at the fewest steps FD grows with eta (eta = 0 best of the DDIM rows, eta = 1
worst), and the eta = 1 minus eta = 0 gap shrinks from the fewest to the most steps.
`:runlocal` (tests): tiny model, 2 etas, S = 2 / 4.
"""

from configs import common
from configs.reproduce import base

PAPER = {  # keys: eta_<value with p for the point> (ConfigDict keys take no dots)
    "steps": [10, 20, 50, 100],
    "fid": {
        "eta_0": [13.36, 6.84, 4.67, 4.16],
        "eta_0p2": [14.04, 7.11, 4.77, 4.25],
        "eta_0p5": [16.66, 8.35, 5.25, 4.46],
        "eta_1": [41.07, 18.36, 8.01, 5.78],
        "sigma_hat": [367.43, 133.37, 32.72, 9.99],
    },
    "ddpm_1000": 3.17,
}


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",), steps=2000)
    c = base.claim(
        "ddim", v.runlocal, "DDIM: eta x steps (Song et al. 2021, Table 1)",
        "CIFAR-10 FID, S = 10/20/50/100: eta=0 13.36/6.84/4.67/4.16, eta=1 41.07/18.36/8.01/5.78; "
        "sigma-hat 367.43/133.37/32.72/9.99; 1000-step DDPM 3.17",
        "at the fewest steps FD grows with eta, and the eta=1 - eta=0 gap shrinks with more steps",
        base.DIGITS_CAVEAT,
    )  # fmt: skip
    c.model = base.digits_model("eps", steps=v.steps, runlocal=v.runlocal)
    c.etas = (0.0, 0.2, 0.5, 1.0)
    c.steps = (10, 20, 50, 100)
    c.ddpm_steps = 1000
    c.paper_numbers = PAPER
    if v.runlocal:
        c.etas, c.steps, c.ddpm_steps = (0.0, 1.0), (2, 4), 8
    return c
