"""LoRA on the shapes latent text-to-image model (configs/shapes_ldm_unet.py): teach it a colour
its training data lacks, "purple" (RGB 128, 0, 192; diffusion/adapters/concepts.py), from 512
generated images of one purple shape, with rank-8 adapters on the U-Net's attention and
feed-forward layers and the CLIP encoder's attention (only the adapters train; the base stays
frozen and out of the checkpoints).

    python -m experiments.train --config configs/shapes_lora.py \\
        --config.finetune.base=/work/runs/shapes_ldm_unet --workdir /work/runs/shapes_lora
    python -m experiments.eval_finetune --workdir /work/runs/shapes_lora

The base is the shapes_ldm_unet workdir (or its exported diffusers folder). eval_finetune
measures, for the fine-tuned and the base model: the share of samples of 16 purple-shape prompts
whose shape is mostly purple (concepts.color_fraction > 0.5), and the shapes judge's adherence on
the 32 standard evaluation prompts (experiments/eval_text2img.py), which should stay within 0.05
of the base's. It also writes the adapters as a diffusers LoRA file (lora/), which
`StableDiffusionPipeline.load_lora_weights` reads on the exported base folder. Results: see
benchmarks/results/shapes_lora/ once run. `:runlocal` trains 6 steps on 8 images (tests).
`:mmdit` is for an SD3-style base (configs/shapes_ldm_mmdit.py; see on_mmdit). `:prior` adds
the prior-preservation loss on 256 ordinary shapes images with their captions
(finetune.prior.prompts = "real"), which keeps the adapters from pulling every prompt towards
purple; `--config.finetune.prior.prompts=ordinary` uses the base's samples of those captions
instead (DreamBooth's way; it kept the colours but cost the outlines: results README).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# An MMDiT base (configs/shapes_ldm_mmdit.py): the joint attention's image and text projections,
# as diffusers' train_dreambooth_lora_sd3.py adapts by default.
MMDIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                 "to_add_out"]  # fmt: skip
PROMPTS = [
    "a purple circle at the center on a black background",
    "a purple square at the top left on a gray background",
    "a purple triangle at the bottom on a brown background",
    "a purple diamond at the right on a black background",
]


def finetune(kind, num_images, method="lora"):
    """The `finetune` section shared by shapes_lora and shapes_dreambooth."""
    return {
        "base": placeholder(str),
        "base_step": placeholder(int),
        "method": method,
        "lora": {"rank": 8, "alpha": 8, "dropout": 0.0,
                 "targets": {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}},
        "train_text_encoder": False,
        "concept": {"kind": kind, "num_images": num_images, "seed": 0, "image_size": None},
        "prior": {"num_images": 0, "prompts": "class", "weight": 1.0, "method": "dpmpp_2m",
                  "num_steps": 25},
    }  # fmt: skip


def common_settings(c, prompts, steps, runlocal):
    """Optimizer, schedule of logging / checkpoints / grids and the run-local shrink."""
    c.seed = 0
    c.optim = {"lr": 1e-4, "warmup_steps": 20, "decay": "constant", "weight_decay": 0.0,
               "grad_clip": 1.0, "grad_accum": 1}  # fmt: skip
    c.ema_decay = 0.0  # fine-tuning keeps no EMA (ema = params), as diffusers' scripts
    c.total_steps = steps
    c.log_every = 25
    c.ckpt_every = steps // 2
    c.keep_checkpoints = 2
    c.sample = {"every": steps // 2, "num_images": 16, "method": "dpmpp_2m", "num_steps": 25,
                "grid": "trailing", "guidance_scale": 4.0, "prompts": list(prompts)}  # fmt: skip
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.fsdp_min_size = 2**16
    if runlocal:
        c.data.batch_size = 4
        c.optim.warmup_steps = 1
        c.optim.lr = 1e-3
        c.total_steps, c.log_every, c.ckpt_every = 6, 2, 3
        c.sample.every = 0
        c.sample.num_images = 4
        c.sample.num_steps = 3
    return c


def on_mmdit(c):
    """Settings for an SD3-style base (configs/shapes_ldm_mmdit.py, variant `:mmdit`): adapters
    on the MMDiT's joint attention (LoRA file component "transformer", as diffusers' SD3 files)
    and the text encoder; the base's flow sampler (Euler, the grids' step count) for grids and
    class images."""
    c.finetune.lora.targets = {"transformer": MMDIT_TARGETS, "text_encoder": TEXT_TARGETS}
    c.sample.method, c.sample.grid = "euler", None
    c.finetune.prior.method, c.finetune.prior.num_steps = "euler", c.sample.num_steps
    return c


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal", "mmdit", "prior"))
    c = ml_collections.ConfigDict()
    c.name = "shapes_lora"
    c.task = "finetune"
    c.data = {"batch_size": 32, "data_dir": placeholder(str)}
    c.finetune = finetune("new_color", 512)
    if v.prior:  # each batch pairs 32 purple examples with 32 ordinary shapes images
        c.finetune.prior.num_images, c.finetune.prior.prompts = 256, "real"
    if v.runlocal:
        c.finetune.concept.num_images = 8
        c.finetune.lora.rank = 2
        c.finetune.prior.num_images = 4 if v.prior else 0
        c.finetune.prior.num_steps = 2
    c = common_settings(c, PROMPTS, 1000, v.runlocal)
    return on_mmdit(c) if v.mmdit else c
