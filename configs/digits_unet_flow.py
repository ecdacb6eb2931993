"""Class-conditional pixel U-Net on 8x8 digits trained with rectified flow (velocity
prediction, SD3 logit-normal time density), sampled with Euler on the flow ODE.

    python -m experiments.train --config configs/digits_unet_flow.py --workdir /tmp/digits_flow

Same network and data as configs/digits_unet_eps.py; `:runlocal` finishes in under 2 minutes.
"""

from configs import digits_unet_eps


def get_config(arg=None):
    variants = ",".join(filter(None, ["flow", arg]))
    return digits_unet_eps.get_config(variants)
