"""Tiny random-weight SD1 / SD2 (v-prediction) / SDXL diffusers folders for the single-file
tests, written once per session with diffusers' `save_pretrained`, and their single files.

The U-Nets have two levels (so downsamplers, upsamplers and channel-changing resnets with
shortcut convolutions get key-mapped: input_blocks.2.0.op, output_blocks.1.1.conv /
output_blocks.1.2.conv, skip_connection) and the VAE two levels (nin_shortcut, downsample,
upsample, 1x1-conv attention); each folder's VAE has its own weights (VAE swap tests). SDXL's two text encoders have different widths (32 and 48):
diffusers tells its CLIP-L from its OpenCLIP-G embedder by width, so equal widths would load
the first embedder's weights into both.

`real_world_extras(src, dst, arch)` adds what published files carry besides the networks'
weights (LatentDiffusion's schedule buffers, EMA bookkeeping, CLIP position_ids, OpenCLIP
logit_scale and, for SD2, the text tower's unused 24th block).
"""

import diffusers
import numpy as np
import pytest
import torch
import transformers
from _pipeline_fixtures import MAX_LEN, SD_SCHEDULER, _randomize, clip_tokenizer, vae
from safetensors.numpy import load_file, save_file

from diffusion import pipelines


def text_encoder(tok, *, hidden=32, act="quick_gelu", projection=False, seed=2, layers=2):
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        projection_dim=24, num_hidden_layers=layers, num_attention_heads=4, hidden_act=act,
        max_position_embeddings=MAX_LEN, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return _randomize(cls(cfg), seed)


def unet(*, cross, sdxl=False, linear=False, seed=0):
    """Two levels: SD's (cross-attention, plain) or SDXL's (plain, cross-attention) order."""
    down = ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D")
    kw = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=cross,
        attention_head_dim=8, use_linear_projection=linear,
    )  # fmt: skip
    if sdxl:  # text_time: 6 ids x 8 + the 24-d pooled projection; 2 transformer layers
        down, up = down[::-1], up[::-1]
        kw |= dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 24,
                   transformer_layers_per_block=(1, 2))  # fmt: skip
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(down_block_types=down, up_block_types=up, **kw)
    return _randomize(model, seed)


def write_sd1(path):
    tok = clip_tokenizer()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(seed=1), text_encoder=text_encoder(tok), tokenizer=tok, unet=unet(cross=32),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER, clip_sample=False,
                                          set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return str(path)


def write_sd2(path):
    """OpenCLIP-style text tower (gelu), linear projections in the transformer blocks,
    v-prediction DDIM (as stable-diffusion-2-1)."""
    tok = clip_tokenizer(pad_token="!")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(seed=11), text_encoder=text_encoder(tok, act="gelu", seed=3), tokenizer=tok,
        unet=unet(cross=32, linear=True, seed=5),
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER, clip_sample=False,
                                          set_alpha_to_one=False, steps_offset=1,
                                          prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return str(path)


def write_sdxl(path):
    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(seed=12), text_encoder=text_encoder(tok, seed=6),
        text_encoder_2=text_encoder(tok2, hidden=48, act="gelu", projection=True, seed=7),
        tokenizer=tok, tokenizer_2=tok2, unet=unet(cross=32 + 48, sdxl=True, linear=True, seed=8),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading",
                                                   steps_offset=1),
        add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return str(path)


WRITERS = {"sd1": write_sd1, "sd2": write_sd2, "sdxl": write_sdxl}
REFERENCE = {"sd1": diffusers.StableDiffusionPipeline, "sd2": diffusers.StableDiffusionPipeline,
             "sdxl": diffusers.StableDiffusionXLPipeline}  # fmt: skip
TEXT_PREFIX = {"sd1": "cond_stage_model.transformer.", "sd2": "cond_stage_model.model.",
               "sdxl": "conditioner.embedders.1.model."}  # fmt: skip


def real_world_extras(src, dst, arch):
    """Copy of single file `src` with the non-weight entries published files carry."""
    tensors = load_file(src)
    n = 1000
    extras = {"betas": np.linspace(1e-4, 2e-2, n), "alphas_cumprod": np.linspace(1, 0, n),
              "model_ema.decay": np.array(0.9999), "model_ema.num_updates": np.array(1000)}  # fmt: skip
    prefix = TEXT_PREFIX[arch]
    if arch == "sd1":
        extras[prefix + "text_model.embeddings.position_ids"] = np.arange(MAX_LEN)[None]
    else:
        extras[prefix + "logit_scale"] = np.array(4.6)
    if arch == "sd2":  # the 24th block of OpenCLIP-H (diffusers keeps 23): here block 2 of 2
        block = prefix + "transformer.resblocks."
        for key in [k for k in tensors if k.startswith(block + "1.")]:
            extras[key.replace(block + "1.", block + "2.")] = tensors[key] * 0.5
        extras[prefix + "text_projection"] = np.eye(32, dtype=np.float32)
    tensors.update({k: np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype)
                    for k, v in extras.items()})  # fmt: skip
    save_file(tensors, dst)
    return dst


@pytest.fixture(scope="session")
def sf_folders(tmp_path_factory):
    """{arch: diffusers folder}."""
    return {a: w(tmp_path_factory.mktemp(f"sf_{a}")) for a, w in WRITERS.items()}


@pytest.fixture(scope="session")
def sf_files(sf_folders, tmp_path_factory):
    """{arch: single file written by save_single_file, with real files' extra entries}."""
    out = {}
    for arch, folder in sf_folders.items():
        d = tmp_path_factory.mktemp(f"sf_{arch}_file")
        plain = str(d / "plain.safetensors")
        pipelines.save_single_file(folder, plain)
        out[arch] = real_world_extras(plain, str(d / f"{arch}.safetensors"), arch)
    return out
