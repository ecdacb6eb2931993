"""Text-to-image on 32x32 coloured shapes: an SD3-style MMDiT (diffusers SD3Transformer2DModel)
on pixels with rectified flow (velocity prediction, SD3 logit-normal time density; Esser et al.
2024), conditioned on a CLIP text encoder (transformers CLIPTextModelWithProjection) trained
jointly from scratch with a word-level tokenizer over the captions' vocabulary. Captions are
dropped (replaced by the empty prompt) 10% of the time for classifier-free guidance.

    python -m experiments.train --config configs/shapes_mmdit_flow.py --workdir /tmp/shapes_mmdit

Produces samples_*.png (one image per entry of `sample.prompts`, repeated; Euler on the flow
ODE, guidance 3), metrics.jsonl, TensorBoard events, report.md and checkpoints/. The full run
(shapes/32x32, prepared on first use in about 5 minutes) is meant for a GPU. `:runlocal` trains
a 2-layer, width-64 MMDiT and a 1-layer CLIP for 40 steps on shapes/tiny (256 images), saves
checkpoints at steps 20 and 40 and finishes in under 2 minutes on 2 CPU cores.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common
from diffusion.data.tokenizer import SPECIAL_WORDS

# Sample-grid prompts (also used by the other shapes text configs).
PROMPTS = (
    "a red circle at the center on a black background",
    "a blue square at the top left on a gray background",
    "a yellow triangle at the bottom right on a brown background",
    "a green diamond at the top on a black background",
    "a white circle above a magenta square on a gray background",
    "a cyan square to the left of a orange triangle on a black background",
    "a orange diamond below a green circle on a brown background",
    "a magenta triangle to the right of a blue diamond on a gray background",
)


def caption_words() -> list[str]:
    """Every word the shapes captions use (diffusion/data/shapes.py), in a fixed order."""
    from diffusion.data import shapes

    phrases = ["a at the on background", *shapes.SHAPES, *shapes.COLORS, *shapes.BACKGROUNDS]
    phrases += [*shapes.RELATIONS[1:], *(w for row in shapes._GRID for w in row)]
    words = []
    for w in " ".join(phrases).split():
        if w not in words:
            words.append(w)
    return words


def clip(words, width=128, layers=2, max_length=16):
    return {
        "vocab_size": len(SPECIAL_WORDS) + len(words),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "projection_dim": width,
        "num_hidden_layers": layers,
        "num_attention_heads": max(width // 32, 1),
        "max_position_embeddings": max_length,
        "hidden_act": "quick_gelu",
        "bos_token_id": 2,
        "eos_token_id": 3,  # pooled output at the first <eos> (id 2 would select legacy argmax)
        "pad_token_id": 0,
    }


def mmdit(text_width=128, heads=4, layers=4):
    dim = heads * 32
    return {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 3,
        "out_channels": 3,
        "num_layers": layers,
        "attention_head_dim": 32,
        "num_attention_heads": heads,
        "joint_attention_dim": text_width,  # = CLIP hidden_size (token states)
        "caption_projection_dim": dim,
        "pooled_projection_dim": text_width,  # = CLIP projection_dim (pooled text embedding)
        "pos_embed_max_size": 16,  # 32 / patch 2
        "qk_norm": "rms_norm",
    }


def get_config(arg=None):
    v = common.parse(arg, flags=("runlocal",))
    words = caption_words()
    c = ml_collections.ConfigDict()
    c.name = "shapes_mmdit_flow"
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
        # The longest caption ("a red circle to the right of a blue square on a black
        # background") is 14 words, + <bos> and <eos>.
        "tokenizer": {"kind": "word", "vocab": " ".join(words), "max_length": 16},
        "text_encoder": {"class_name": "CLIPTextModelWithProjection", "config": clip(words)},
        "hidden_state": -1,
        "pooled_as": "pooled_projections",
    }
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
        "method": "euler",
        "num_steps": 30,
        "guidance_scale": 3.0,
        "prompts": list(PROMPTS),
    }
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.fsdp_min_size = 2**16
    if v.runlocal:
        c.data.name = "shapes/tiny"
        c.data.batch_size = 16
        c.conditioning.text_encoder.config = clip(words, width=64, layers=1)
        c.model.config = mmdit(text_width=64, heads=2, layers=2)
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
