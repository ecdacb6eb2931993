"""diffusers/transformers config.json dicts of the published Stable Diffusion parts.

Typed from the public model cards / config files (nothing is downloaded): the dicts are what
``config.json`` of each folder holds, so ``Config.from_diffusers(get_preset(name))`` builds the
full-size module and ``diffusers.<Class>.from_config`` builds the PyTorch reference.
tests/test_presets.py checks that our parameter counts equal the PyTorch ones exactly.

  sd15-unet        runwayml/stable-diffusion-v1-5  unet/          UNet2DConditionModel  860M
  sd21-unet        stabilityai/stable-diffusion-2-1 unet/         UNet2DConditionModel  866M
  sdxl-unet        stabilityai/stable-diffusion-xl-base-1.0 unet/ UNet2DConditionModel  2.6B
  sd-vae           SD 1.x/2.x vae/ (4 latent channels, scaling 0.18215)   AutoencoderKL  84M
  sdxl-vae         SDXL vae/ (same architecture, scaling 0.13025)         AutoencoderKL  84M
  sd3-vae          SD3 vae/ (16 channels, scaling 1.5305, shift 0.0609, no quant convs)  84M
  sd3-medium       stable-diffusion-3-medium transformer/  SD3Transformer2DModel  2.0B
  sd35-large       stable-diffusion-3.5-large transformer/ (qk rms_norm)          8.1B
  clip-l           CLIP ViT-L/14 text tower (SD1.x text_encoder)  CLIPTextModel   123M
  clip-l-proj      + text_projection (SDXL/SD3 text_encoder)  CLIPTextModelWithProjection
  openclip-g       OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2, SD3 text_encoder_2)
"""

from __future__ import annotations

import copy
from typing import Any

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _SD_UP,
}

SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}

SDXL_UNET = {
    **SD15_UNET,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

SD3_VAE = {
    **SD_VAE,
    "force_upcast": True,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

SD3_MEDIUM = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

SD35_LARGE = {
    **SD3_MEDIUM,
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}

CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

CLIP_L_PROJ = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}

OPENCLIP_G = {
    **CLIP_L,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

PRESETS: dict[str, dict[str, Any]] = {
    "sd15-unet": SD15_UNET,
    "sd21-unet": SD21_UNET,
    "sdxl-unet": SDXL_UNET,
    "sd-vae": SD_VAE,
    "sdxl-vae": SDXL_VAE,
    "sd3-vae": SD3_VAE,
    "sd3-medium": SD3_MEDIUM,
    "sd35-large": SD35_LARGE,
    "clip-l": CLIP_L,
    "clip-l-proj": CLIP_L_PROJ,
    "openclip-g": OPENCLIP_G,
}


def class_name(config: dict[str, Any]) -> str:
    """The diffusers ``_class_name`` or the transformers ``architectures[0]`` of a config."""
    if "_class_name" in config:
        return config["_class_name"]
    if config.get("architectures"):
        return config["architectures"][0]
    raise ValueError("config has neither '_class_name' (diffusers) nor 'architectures' (HF)")


def get_preset(name: str) -> dict[str, Any]:
    """A deep copy of the config dict of preset ``name`` (safe to modify)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
