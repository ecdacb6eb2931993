"""Tiny random-weight diffusers pipeline folders for the pipeline tests, written once per
session with diffusers' own `save_pretrained` (no network): a byte-level BPE CLIP tokenizer
(vocab.json + merges.txt), a Unigram T5 tokenizer (tokenizer.json), 2-layer width-32 CLIP
encoders, a 2-layer T5, a one-level width-32 U-Net / 2-layer MMDiT on 8x8 latents and a factor-2 VAE
(16x16 images).

Import the fixtures into a test module: `from _pipeline_fixtures import sd_folder`.
"""

import json
import os
import shutil

import diffusers
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

MAX_LEN = 16  # CLIP context (max_position_embeddings)
T5_LEN = 12  # SD3 max_sequence_length in the tests
WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "the", "on", "at", "cube", "ball"]


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> transformers.CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer over the byte alphabet plus whole-word merges."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = []
    for word in WORDS:  # merge each word letter by letter into one token
        piece = word[0]
        for j, ch in enumerate(word[1:], 1):
            nxt = ch + "</w>" if j == len(word) - 1 else ch
            merges.append((piece, nxt))
            piece += nxt
            vocab.setdefault(piece, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = MAX_LEN
    return tok


def t5_tokenizer() -> transformers.T5TokenizerFast:
    """Unigram (sentencepiece-style) T5 tokenizer: whole words plus single letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    pieces += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -15.0)]
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0)


def _randomize(model, seed, scale=1.0):
    """Unit-scale random weights (default inits leave tiny networks nearly constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.2 * r)
            elif name.endswith(("embedding.weight", "shared.weight", "embed_tokens.weight")):
                p.copy_(r)  # token / position tables
            else:
                p.copy_(scale * r / np.sqrt(p[0].numel()))
    return model.eval()


def clip(tok, *, projection: bool, seed: int, hidden: int = 32, layers: int = 2):
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=32,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LEN,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return _randomize(cls(cfg), seed)


def unet(*, in_channels=4, cross=32, sdxl=False, seed=0):
    """One resolution level (cross-attention down, mid and up blocks): the U-Net itself is
    tested against diffusers in test_unet.py; here compile time matters."""
    kw = dict(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32,), norm_num_groups=8, cross_attention_dim=cross,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    )  # fmt: skip
    if sdxl:  # text_time micro-conditioning: 6 ids x 8 + the 32-d pooled projection
        kw |= dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 32,
                   use_linear_projection=True, transformer_layers_per_block=1)  # fmt: skip
    torch.manual_seed(seed)
    return _randomize(diffusers.UNet2DConditionModel(**kw), seed)


def vae(*, shift=None, quant=True, seed=1):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=1.5, shift_factor=shift, use_quant_conv=quant, use_post_quant_conv=quant,
    )  # fmt: skip
    return _randomize(model, seed)


def t5(tok, *, seed=5):
    cfg = transformers.T5Config(
        vocab_size=len(tok), d_model=80, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        dropout_rate=0.0,
    )  # fmt: skip
    return _randomize(transformers.T5EncoderModel(cfg), seed)


def mmdit(seed=6):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=80,
        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8,
    )  # fmt: skip
    return _randomize(model, seed)


SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def write_sd(path, *, in_channels=4):
    tok = clip_tokenizer()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(), text_encoder=clip(tok, projection=False, seed=2), tokenizer=tok,
        unet=unet(in_channels=in_channels), scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    if in_channels == 9:  # the class name of an inpainting folder
        _edit_index(path, _class_name="StableDiffusionInpaintPipeline")
    return str(path)


def write_sdxl(path):
    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip(tok, projection=False, seed=2),
        text_encoder_2=clip(tok2, projection=True, seed=3), tokenizer=tok, tokenizer_2=tok2,
        unet=unet(cross=64, sdxl=True, seed=4),
        scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading",
                                                   steps_offset=1),
        add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return str(path)


def write_sd3(path, *, with_t5=True):
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=mmdit(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift=0.1, quant=False), text_encoder=clip(tok, projection=True, seed=7),
        tokenizer=tok, text_encoder_2=clip(tok, projection=True, seed=8), tokenizer_2=tok,
        text_encoder_3=t5(tok3), tokenizer_3=tok3,
    )  # fmt: skip
    pipe.save_pretrained(path)
    if not with_t5:
        shutil.rmtree(os.path.join(path, "text_encoder_3"))
        shutil.rmtree(os.path.join(path, "tokenizer_3"))
        _edit_index(path, text_encoder_3=[None, None], tokenizer_3=[None, None])
    return str(path)


def write_tiny(path):
    """The smallest folder, in the layout the project's own exports use: a pixel-space
    (no VAE) 1-layer MMDiT on 8x8 RGB, one CLIP encoder, a CLIPTokenizer folder of vocab.json +
    merges.txt only, rectified flow. diffusers cannot load it (SD3 needs two CLIPs); we can."""
    path = str(path)
    tok = clip_tokenizer()
    torch.manual_seed(9)
    transformer = _randomize(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
    ), 9)  # fmt: skip
    transformer.save_pretrained(os.path.join(path, "transformer"))
    clip(tok, projection=True, seed=10, layers=1).save_pretrained(
        os.path.join(path, "text_encoder")
    )
    folder = os.path.join(path, "tokenizer")
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(tok.get_vocab(), f)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": MAX_LEN}, f)
    diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(
        os.path.join(path, "scheduler")
    )
    none = [None, None]
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "vae": none,
             "text_encoder_2": none, "tokenizer_2": none, "text_encoder_3": none,
             "tokenizer_3": none}  # fmt: skip
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return path


def _edit_index(path, **entries):
    file = os.path.join(path, "model_index.json")
    with open(file) as f:
        index = json.load(f)
    index.update(entries)
    with open(file, "w") as f:
        json.dump(index, f)


def _folder(name, writer, **kw):
    """A session fixture writing one folder (once per xdist worker)."""

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        return writer(tmp_path_factory.mktemp(name), **kw)

    return fixture


tiny_folder = _folder("tiny", write_tiny)
sd_folder = _folder("sd", write_sd)
sd_inpaint_folder = _folder("sd_inpaint", write_sd, in_channels=9)
sdxl_folder = _folder("sdxl", write_sdxl)
sd3_folder = _folder("sd3", write_sd3)
sd3_no_t5_folder = _folder("sd3_no_t5", write_sd3, with_t5=False)
