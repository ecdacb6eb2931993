"""A ControlNet (Zhang et al. 2023) on the shapes latent text-to-image model: the control image
is the exact silhouette of the caption's shapes (the generator's layout,
diffusion/adapters/concepts.py), so how well samples follow it is measurable. The ControlNet
starts as a copy of the U-Net's encoder with zero convolutions and is the only part trained;
captions are dropped 10% of the time as in the base's training, the control never.

    python -m experiments.train --config configs/shapes_controlnet.py \\
        --config.controlnet.base=/work/runs/shapes_ldm_unet --workdir /work/runs/shapes_controlnet
    python -m experiments.eval_finetune --workdir /work/runs/shapes_controlnet

eval_finetune draws samples for test-split captions with and without their layout as control
and reports the mean IoU of each sample's foreground with the layout mask (the controlled
samples should score far higher), plus the judge's adherence to the captions. Results:
benchmarks/results/shapes_controlnet/ once run. `:runlocal` trains 6 steps on shapes/tiny.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common
from configs.shapes_lora import common_settings
from configs.shapes_mmdit_flow import PROMPTS


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    c = ml_collections.ConfigDict()
    c.name = "shapes_controlnet"
    c.task = "controlnet"
    c.data = {"name": "shapes/32x32", "batch_size": 32, "data_dir": placeholder(str),
              "image_size": placeholder(int)}  # fmt: skip
    c.controlnet = {"base": placeholder(str), "base_step": placeholder(int),
                    "conditioning_embedding_out_channels": [16, 32]}  # fmt: skip
    c = common_settings(c, PROMPTS, 3000, v.runlocal)
    c.sample.num_images = 8
    if v.runlocal:
        c.data.name = "shapes/tiny"
        c.controlnet.conditioning_embedding_out_channels = [8, 16]
    return c
