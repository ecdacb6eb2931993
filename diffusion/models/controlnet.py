"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models", sec. 3.2, eq. 2) in channels-last Flax NNX, mirroring diffusers `ControlNetModel`.

A trainable copy of the U-Net's encoder (conv_in, time / class / SDXL embeddings, down blocks,
mid block) sees the noisy latents plus an embedding of the control image (a small conv net,
`controlnet_cond_embedding`, from pixels to the latent size); "zero convolutions" (1x1 convs
initialised at zero, `controlnet_down_blocks`, `controlnet_mid_block`) turn each encoder
feature into a residual that the frozen U-Net adds to its skip connections and mid block:

    down, mid = controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=image,
                           conditioning_scale=1.0)
    eps = unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
               mid_block_additional_residual=mid)

`ControlNetModel.from_unet(unet)` builds one from a U-Net and copies its encoder weights (the
paper's initialisation); `models.load_diffusers` / `save_diffusers` read and write diffusers
folders. The control image is NHWC at pixel size, values in [0, 1]
(StableDiffusionControlNetPipeline's preprocessing), and must be 2^(len(
conditioning_embedding_out_channels) - 1) times the latent size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import TimestepEmbedding, conv
from diffusion.models.partitioning import remat_call
from diffusion.models.unet import UNet, UNetConfig, _opts, _tupled
from diffusion.models.unet_blocks import DOWN_BLOCKS, DownBlock, MidBlock

_CONTROL_KEYS = ("conditioning_channels", "controlnet_conditioning_channel_order",
                 "conditioning_embedding_out_channels", "global_pool_conditions")  # fmt: skip
# UNetConfig fields diffusers' ControlNetModel does not take.
_NOT_CONTROLNET = (
    "out_channels", "center_input_sample", "up_block_types", "attn_norm_num_groups",
    "add_attention", "time_embedding_dim", "conv_in_kernel", "conv_out_kernel",
    "time_embedding_type", "dual_cross_attention", "time_cond_proj_dim", "timestep_post_act",
    "time_embedding_act_fn", "class_embeddings_concat", "cross_attention_norm",
    "resnet_skip_time_act", "resnet_out_scale_factor", "reverse_transformer_layers_per_block",
    "attention_type", "downsample_type", "upsample_type", "mid_block_only_cross_attention",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """diffusers ControlNetModel config.json fields: the U-Net encoder's (UNetConfig) plus the
    control image's channels, channel order, embedding widths and global pooling."""

    class_name: str = "ControlNetModel"
    up_block_types: tuple[str, ...] = ()
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def __post_init__(self):
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                "controlnet_conditioning_channel_order must be 'rgb' or 'bgr', got "
                f"{self.controlnet_conditioning_channel_order!r}"
            )
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(
                f"mid_block_type={self.mid_block_type!r}: only 'UNetMidBlock2DCrossAttn' is "
                "supported for a ControlNetModel"
            )
        if not isinstance(self.layers_per_block, int):
            raise ValueError("a ControlNetModel takes one int layers_per_block")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], **overrides) -> ControlNetConfig:
        d = dict(d)
        name = d.pop("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            raise ValueError(f"_class_name {name!r} is not ControlNetModel")
        own = {k: _tupled(d.pop(k)) for k in _CONTROL_KEYS if k in d}
        d.pop("addition_embed_type_num_heads", None)
        unet = UNetConfig.from_diffusers({**d, "_class_name": "UNet2DConditionModel"})
        kw = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
        kw.update(class_name="ControlNetModel", up_block_types=(), **own, **overrides)
        return cls(**kw)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **control) -> ControlNetConfig:
        """The ControlNet config for a U-Net config (diffusers' from_unet), control options
        (conditioning_channels, conditioning_embedding_out_channels, ...) as keywords."""
        kw = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
        kw.update(class_name="ControlNetModel", up_block_types=(), time_embedding_dim=None,
                  **control)  # fmt: skip
        return cls(**kw)

    def to_diffusers(self) -> dict[str, Any]:
        d = UNetConfig.to_diffusers(dataclasses.replace(self, class_name="UNet2DConditionModel"))
        d = {k: v for k, v in d.items() if k not in _NOT_CONTROLNET}
        return {**d, "_class_name": "ControlNetModel"}


class ControlNetConditioningEmbedding(nnx.Module):
    """diffusers `ControlNetConditioningEmbedding`: conv_in, pairs of (3x3, stride-2 3x3)
    convs with SiLU (downsampling 2^(n-1) times), then a zero-initialised conv_out."""

    def __init__(self, embedding_channels, channels_in, widths, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = conv(channels_in, widths[0], 3, **kw)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [conv(a, a, 3, **kw), conv(a, b, 3, stride=2, **kw)]
        self.blocks = nnx.List(blocks)
        self.conv_out = _zero(conv(widths[-1], embedding_channels, 3, **kw))

    def __call__(self, x):
        x = jax.nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


def _zero(layer):
    """A zero-initialised layer (the paper's zero convolution)."""
    for name in ("kernel", "bias"):
        var = getattr(layer, name, None)
        if var is not None:
            var.set_value(jnp.zeros_like(var[...]))
    return layer


class ControlNetModel(nnx.Module):
    """diffusers ControlNetModel (NHWC); see the module docstring.

    __call__(sample (B, h, w, C), timestep, encoder_hidden_states (B, L, D), *,
    controlnet_cond (B, H, W, conditioning_channels) in [0, 1], conditioning_scale=1.0,
    class_labels=None, added_cond_kwargs=None, guess_mode=False) -> (down residuals tuple,
    mid residual), shaped like the U-Net's skips / mid-block output.
    """

    diffusers_class = "ControlNetModel"
    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):  # fmt: skip
        cfg, kw = config, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype = cfg, dtype
        ch, n, temb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.time_embed_dim
        if len(cfg.down_block_types) != n:
            raise ValueError(f"down_block_types {cfg.down_block_types} and block_out_channels "
                             f"{ch} must have the same length")  # fmt: skip
        self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb, act_fn=cfg.act_fn, **kw)
        self.class_embedding = self.add_embedding = nnx.data(None)
        if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
            self.class_embedding = nnx.Embed(cfg.num_class_embeds, temb, **kw)
        elif cfg.class_embed_type in ("timestep", "projection"):
            d_in = ch[0] if cfg.class_embed_type == "timestep" else (
                cfg.projection_class_embeddings_input_dim)  # fmt: skip
            self.class_embedding = TimestepEmbedding(d_in, temb, act_fn="silu", **kw)
        if cfg.addition_embed_type == "text_time":
            d_in = cfg.projection_class_embeddings_input_dim
            self.add_embedding = TimestepEmbedding(d_in, temb, act_fn="silu", **kw)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, **kw
        )
        heads, tlayers = cfg.heads(), cfg.per_block(cfg.transformer_layers_per_block)
        down, zeros = [], [_zero(conv(ch[0], ch[0], 1, **kw))]
        for i, name in enumerate(cfg.down_block_types):
            down.append(DownBlock(
                ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block,
                attention=DOWN_BLOCKS[name], opts=_opts(cfg, temb, i), add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, heads=heads[i],
                transformer_layers=tlayers[i], **kw,
            ))  # fmt: skip
            count = cfg.layers_per_block + (i < n - 1)
            zeros += [_zero(conv(ch[i], ch[i], 1, **kw)) for _ in range(count)]
        self.down_blocks = nnx.List(down)
        self.controlnet_down_blocks = nnx.List(zeros)
        self.mid_block = MidBlock(
            ch[-1], attention="cross", opts=_opts(cfg, temb, n - 1), heads=heads[-1],
            transformer_layers=tlayers[-1], output_scale_factor=cfg.mid_block_scale_factor, **kw,
        )  # fmt: skip
        self.controlnet_mid_block = _zero(conv(ch[-1], ch[-1], 1, **kw))

    @property
    def cond_factor(self) -> int:
        """Control image size / latent size."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def __call__(
        self, sample, timestep, encoder_hidden_states=None, *, controlnet_cond,
        conditioning_scale=1.0, class_labels=None, added_cond_kwargs=None, guess_mode=False,
    ):  # fmt: skip
        cfg, f = self.config, self.cond_factor
        want = (
            sample.shape[0],
            sample.shape[1] * f,
            sample.shape[2] * f,
            cfg.conditioning_channels,
        )
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(
                f"controlnet_cond has shape {tuple(controlnet_cond.shape)}; this ControlNet "
                f"needs (B, H, W, C) = {want}: {f}x the latent size {sample.shape[1:3]}, "
                f"{cfg.conditioning_channels} channels"
            )
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        emb = UNet._embed(self, timestep, sample.shape[0], class_labels, added_cond_kwargs)
        x = self.conv_in(sample)
        x = x + self.controlnet_cond_embedding(controlnet_cond.astype(x.dtype))
        skips, ctx = [x], encoder_hidden_states
        for block in self.down_blocks:
            x, res = remat_call(block, x, emb, ctx, remat=cfg.remat)
            skips.extend(res)
        x = remat_call(self.mid_block, x, emb, ctx, remat=cfg.remat)
        down = [z(s) for z, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        scale = jnp.asarray(conditioning_scale, x.dtype)
        if scale.ndim == 1:  # one scale per example
            scale = scale[:, None, None, None]  # (B, 1, 1, 1)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.logspace(-1.0, 0.0, len(down) + 1)  # 0.1 .. 1 from shallow to mid
            down, mid = [d * s * scale for d, s in zip(down, scales)], mid * scales[-1] * scale
        else:
            down, mid = [d * scale for d in down], mid * scale
        if cfg.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]  # (B, 1, 1, C)
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid

    @classmethod
    def from_unet(cls, unet: UNet, *, load_weights: bool = True, rngs: nnx.Rngs | None = None,
                  **control) -> ControlNetModel:  # fmt: skip
        """A ControlNet for `unet` (diffusers' from_unet): its encoder weights copied
        (conv_in, time / class / add embeddings, down blocks, mid block), zero convolutions
        at zero. control: conditioning_channels, conditioning_embedding_out_channels, ..."""
        config = ControlNetConfig.from_unet(unet.config, **control)
        net = cls(config, rngs=rngs or nnx.Rngs(0), dtype=unet.dtype,
                  param_dtype=unet.conv_in.kernel[...].dtype)  # fmt: skip
        if load_weights:
            for name in ("conv_in", "time_embedding", "class_embedding", "add_embedding",
                         "down_blocks", "mid_block"):  # fmt: skip
                if getattr(unet, name) is not None:
                    nnx.update(getattr(net, name), nnx.clone(nnx.state(getattr(unet, name))))
        return net


class ControlledUNet(nnx.Module):
    """A U-Net steered by one ControlNet: the U-Net call with the ControlNet's residuals added
    (diffusers' StableDiffusionControlNetPipeline denoiser step)."""

    def __init__(self, unet: UNet, controlnet: ControlNetModel):
        self.unet, self.controlnet = unet, controlnet

    @property
    def config(self):
        return self.unet.config

    def __call__(self, sample, timestep, encoder_hidden_states=None, *, controlnet_cond,
                 conditioning_scale=1.0, class_labels=None, added_cond_kwargs=None):  # fmt: skip
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale, class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs,
        )  # fmt: skip
        return self.unet(
            sample, timestep, encoder_hidden_states, class_labels=class_labels,
            added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )  # fmt: skip
