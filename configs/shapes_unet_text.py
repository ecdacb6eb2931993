"""Text-to-image on 32x32 coloured shapes with an SD1-style U-Net (diffusers UNet2DConditionModel:
cross-attention on the token states of a CLIP text encoder, transformers CLIPTextModel, trained
jointly from scratch with a word-level tokenizer), eps prediction on SD's scaled_linear table,
DPM-Solver++(2M) sampling with classifier-free guidance (captions dropped 10% of the time).

    python -m experiments.train --config configs/shapes_unet_text.py --workdir /tmp/shapes_unet

Produces samples_*.png (one image per entry of `sample.prompts`, repeated), metrics.jsonl,
TensorBoard events, report.md and checkpoints/. The full run (shapes/32x32, 20k steps) is meant
for a GPU and has not been run; the learning evidence of a text-conditioned U-Net is the latent
model of configs/shapes_ldm_unet.py. `:runlocal` trains a tiny U-Net and a 1-layer CLIP for 40
steps on shapes/tiny in about a minute on 2 CPU cores (tests check that the loss falls).

This config exists to show that conditioning is chosen by the config alone: the same task code
trains the MMDiT of shapes_mmdit_flow.py (pooled + token states) and this U-Net (token states).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common
from configs.shapes_mmdit_flow import PROMPTS, caption_words, clip


def unet(channels=(32, 64, 64), cross_attention_dim=128, heads=4):
    return {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": list(channels),
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,  # = CLIP hidden_size
        "attention_head_dim": heads,  # diffusers' name; it is the number of heads in SD1
    }


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    words = caption_words()
    c = ml_collections.ConfigDict()
    c.name = "shapes_unet_text"
    c.task = "diffusion"
    c.seed = 0
    c.data = {
        "name": "shapes/32x32",
        "batch_size": 64,
        "data_dir": placeholder(str),
        "key": "image",
    }
    c.conditioning = {
        "name": "text",
        "tokenizer": {"kind": "word", "vocab": " ".join(words), "max_length": 16},
        "text_encoder": {"class_name": "CLIPTextModel", "config": clip(words)},
        "hidden_state": -1,  # SD1: the final layer-normed token states
        "pooled_as": None,  # SD1's U-Net takes no pooled embedding
    }
    c.model = {"class_name": "UNet2DConditionModel", "config": unet(), "remat": False}
    c.compute_dtype = "float32"
    c.schedule = {"name": "scaled_linear", "kwargs": {}}
    c.objective = {
        "prediction_type": "eps",
        "time_density": "uniform",
        "weighting": "none",
        "cond_dropout": 0.1,
    }
    c.optim = {
        "lr": 3e-4,
        "warmup_steps": 500,
        "decay": "cosine",
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "grad_accum": 1,
    }
    c.ema_decay = 0.999
    c.ema_warmup = True
    c.total_steps = 20000
    c.log_every = 100
    c.ckpt_every = 2000
    c.keep_checkpoints = 3
    c.sample = {
        "every": 2000,
        "num_images": 32,
        "method": "dpmpp_2m",
        "num_steps": 25,
        "guidance_scale": 3.0,
        "clip_x0": (-1.0, 1.0),
        "prompts": list(PROMPTS),
    }
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.fsdp_min_size = 2**16
    if v.runlocal:
        c.data.name = "shapes/tiny"
        c.data.batch_size = 16
        c.conditioning.text_encoder.config = clip(words, width=32, layers=1)
        # Two levels, cross-attention at 16x16 only (32x32 attention made this the slowest test).
        c.model.config = unet(channels=(16, 32), cross_attention_dim=32, heads=2)
        c.model.config.down_block_types = ["DownBlock2D", "CrossAttnDownBlock2D"]
        c.model.config.up_block_types = ["CrossAttnUpBlock2D", "UpBlock2D"]
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 5
        c.ema_decay = 0.9
        c.total_steps = 40
        c.log_every = 5
        c.ckpt_every = 20
        c.sample.every = 40
        c.sample.num_images = 8
        c.sample.num_steps = 5
    return c
