"""A small Stable Diffusion 3 trained here: rectified flow (Esser et al. 2024) with an MMDiT
(diffusers SD3Transformer2DModel) on the shapes VAE's 16x16x4 latents (patch 2: 64 image
tokens), velocity prediction, SD3's logit-normal time density, Euler on the flow ODE. The prompt
is encoded as StableDiffusion3Pipeline does without T5: two CLIP encoders with projection
(transformers CLIPTextModelWithProjection, trained jointly from scratch on the shapes CLIP BPE
tokenizer), penultimate token states concatenated along features (zero-padded to
joint_attention_dim), pooled embeddings concatenated; so the export is a StableDiffusion3Pipeline
folder (text_encoder_3 = None, sampled with max_sequence_length=0).

    python -m experiments.train --config configs/shapes_ldm_mmdit.py --workdir /tmp/shapes_ldm_mmdit
    python -m experiments.eval_text2img --workdir /tmp/shapes_ldm_mmdit
    python -m tools.export_pipeline --workdir /tmp/shapes_ldm_mmdit --out /tmp/shapes_sd3

Continued training (a fresh optimizer and schedule from a trained model's weights): add
`--config.init_from=FOLDER_OR_WORKDIR`. The committed model (benchmarks/results/shapes_ldm_mmdit/
pipeline, full-prompt adherence 0.95) is this config run twice: 5000 steps from scratch
(pipeline_5000, 0.50), then 5000 more with `--config.init_from=.../pipeline_5000`.

Results of the full run: benchmarks/results/shapes_ldm_mmdit/README.md. `:runlocal` trains a
2-layer MMDiT and two 1-layer CLIPs for 40 steps on shapes/tiny latents (tests).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common
from configs.shapes_ldm_unet import TOKENS, clip
from configs.shapes_mmdit_flow import PROMPTS


def text(width=64, layers=2, context=128):
    """SD3's prompt layout without T5 (see the module docstring)."""
    encoder = {"class_name": "CLIPTextModelWithProjection", "config": clip(width, layers)}
    return {
        "name": "text",
        "tokenizer": {"kind": "clip", "path": "shapes", "max_length": TOKENS},
        "text_encoder": encoder,
        "text_encoder_2": encoder,
        "hidden_state": -2,
        "pooled_as": "pooled_projections",
        "context_dim": context,
        "null_tokens": 0,
    }


def mmdit(width=64, heads=4, layers=4, context=128):
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": layers,
        "attention_head_dim": 32,
        "num_attention_heads": heads,
        "joint_attention_dim": context,  # = the padded concatenation of both CLIPs' states
        "caption_projection_dim": heads * 32,
        "pooled_projection_dim": 2 * width,  # both CLIPs' pooled embeddings
        "pos_embed_max_size": 8,  # 16 / patch 2
        "qk_norm": "rms_norm",
    }


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    c = ml_collections.ConfigDict()
    c.name = "shapes_ldm_mmdit"
    c.task = "diffusion"
    c.seed = 0
    c.data = {
        "name": "shapes/32x32",
        "batch_size": 64,
        "data_dir": placeholder(str),
        "key": "latent",
    }
    c.latents = {"vae": common.SHAPES_VAE, "scaling_factor": "auto"}
    # warm start: a run or pipeline folder of this model to continue training (train_state.py)
    c.init_from = placeholder(str)
    c.conditioning = text()
    c.model = {"class_name": "SD3Transformer2DModel", "config": mmdit(), "remat": False}
    c.compute_dtype = "float32"
    c.schedule = {"name": "rectified_flow", "kwargs": {"shift": 1.0}}
    c.objective = {
        "prediction_type": "velocity",
        "time_density": "logit_normal",
        "weighting": "none",
        "cond_dropout": 0.1,
    }
    c.optim = {
        "lr": 5e-4,
        "warmup_steps": 200,
        "decay": "cosine",
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "grad_accum": 1,
    }
    c.ema_decay = 0.999
    c.ema_warmup = True
    # Sized for 2 CPU cores: 27 GFLOP per train step (XLA cost analysis, batch 64).
    c.total_steps = 5000
    c.log_every = 100
    c.ckpt_every = 1000
    c.keep_checkpoints = 10
    c.sample = {
        "every": 1000,
        "num_images": 32,
        "method": "euler",
        "num_steps": 28,
        "guidance_scale": 4.0,
        "prompts": list(PROMPTS),
    }
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.fsdp_min_size = 2**16
    if v.runlocal:
        c.data.name = "shapes/tiny"
        c.data.batch_size = 16
        c.conditioning = text(width=32, layers=2, context=64)
        c.model.config = mmdit(width=32, heads=2, layers=2, context=64)
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
