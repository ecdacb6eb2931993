"""U-Net / VAE stages (channels-last Flax NNX) mirroring diffusers `unet_2d_blocks.py`.

One `DownBlock` class covers diffusers DownBlock2D, AttnDownBlock2D, CrossAttnDownBlock2D and
DownEncoderBlock2D (the attribute names `resnets`, `attentions`, `downsamplers` are the same);
`UpBlock` covers UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D and UpDecoderBlock2D; `MidBlock`
covers UNetMidBlock2D and UNetMidBlock2DCrossAttn. `Transformer2DModel` is the continuous-input
spatial transformer of Stable Diffusion (Rombach et al. 2022, "LDM" Sec. 3.3).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import Attention, FeedForward, conv, group_norm, linear
from diffusion.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

# diffusers block names -> (our block kind, attention kind)
DOWN_BLOCKS = {
    "DownBlock2D": None,
    "AttnDownBlock2D": "self",
    "CrossAttnDownBlock2D": "cross",
    "DownEncoderBlock2D": None,
}
UP_BLOCKS = {
    "UpBlock2D": None,
    "AttnUpBlock2D": "self",
    "CrossAttnUpBlock2D": "cross",
    "UpDecoderBlock2D": None,
}
MID_BLOCKS = {"UNetMidBlock2D": "self", "UNetMidBlock2DCrossAttn": "cross"}


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Options shared by all resnets / attentions of one network (diffusers get_*_block args)."""

    temb_channels: int | None = None
    groups: int = 32
    eps: float = 1e-6
    act: str = "silu"
    time_embedding_norm: str = "default"  # ResnetBlock2D 'default' | 'scale_shift'
    attention_head_dim: int | None = None  # per-head width of 'self' (deprecated-style) blocks
    cross_attention_dim: int | None = None
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attn_implementation: str | None = None


def _lnorm(dim, eps, kw):
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, **kw)


class BasicTransformerBlock(nnx.Module):
    """diffusers `BasicTransformerBlock` (norm_type='layer_norm'): pre-norm self-attention
    (attn1), cross-attention to the text (attn2) and a GEGLU feed-forward (ff)."""

    def __init__(self, dim, heads, dim_head, opts: BlockOptions, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.only_cross = opts.only_cross_attention
        att = dict(heads=heads, dim_head=dim_head, attn_implementation=opts.attn_implementation)
        self.norm1 = _lnorm(dim, 1e-5, kw)
        self.attn1 = Attention(
            dim, opts.cross_attention_dim if self.only_cross else None, **att, **kw
        )
        self.norm2 = self.attn2 = nnx.data(None)
        if opts.cross_attention_dim is not None:
            self.norm2 = _lnorm(dim, 1e-5, kw)
            self.attn2 = Attention(dim, opts.cross_attention_dim, **att, **kw)
        self.norm3 = _lnorm(dim, 1e-5, kw)
        self.ff = FeedForward(dim, activation_fn="geglu", **kw)

    def __call__(self, x, context=None):
        x = self.attn1(self.norm1(x), context if self.only_cross else None) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input (the SD "SpatialTransformer"):
    GroupNorm -> proj_in (1x1 conv, or Linear if use_linear_projection) -> transformer blocks
    -> proj_out -> + residual."""

    def __init__(
        self, channels, heads, num_layers, opts: BlockOptions, *, rngs, dtype, param_dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear = opts.use_linear_projection
        self.norm = group_norm(channels, opts.groups, 1e-6, **kw)
        proj = (
            (lambda a, b: linear(a, b, **kw)) if self.linear else (lambda a, b: conv(a, b, 1, **kw))
        )
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(channels, heads, channels // heads, opts, **kw)
                for _ in range(num_layers)
            ]
        )
        self.proj_out = proj(channels, channels)

    def __call__(self, x, context=None):
        b, h, w, c = x.shape
        y = self.norm(x)
        # A 1x1 conv and a per-token Linear are the same map; only the parameter layout differs.
        y = self.proj_in(y).reshape(b, h * w, c)  # (B, L, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y.reshape(b, h, w, c))  # (B, H, W, C)
        return y + x


def _self_attention(channels, opts: BlockOptions, groups, kw):
    """The (deprecated-style) attention block of UNet2DModel / VAE: GroupNorm + residual."""
    head_dim = opts.attention_head_dim or channels
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        bias=True,
        norm_num_groups=groups,
        eps=opts.eps,
        residual_connection=True,
        attn_implementation=opts.attn_implementation,
        **kw,
    )


def _attention(kind, channels, heads, layers, opts, kw):
    if kind == "self":
        return _self_attention(channels, opts, opts.groups, kw)
    return Transformer2DModel(channels, heads, layers, opts, **kw)


def _resnet(c_in, c_out, opts: BlockOptions, kw, scale=1.0):
    return ResnetBlock2D(
        c_in,
        c_out,
        temb_channels=opts.temb_channels,
        groups=opts.groups,
        eps=opts.eps,
        non_linearity=opts.act,
        time_embedding_norm=opts.time_embedding_norm,
        output_scale_factor=scale,
        **kw,
    )


def _call_attn(attn, x, context):
    return attn(x) if isinstance(attn, Attention) else attn(x, context)


class DownBlock(nnx.Module):
    """One encoder stage: `num_layers` x (resnet [+ attention]) then an optional stride-2 conv.

    __call__ returns (h, skips) where skips holds every resnet/attention output and the
    downsampled output, as diffusers `output_states`.
    """

    def __init__(
        self, c_in, c_out, *, num_layers, attention, opts: BlockOptions, add_downsample,
        downsample_padding=1, heads=1, transformer_layers=1, rngs, dtype, param_dtype,
    ):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        layers = _per_layer(transformer_layers, num_layers)
        self.resnets = nnx.List(
            [_resnet(c_in if i == 0 else c_out, c_out, opts, kw) for i in range(num_layers)]
        )
        self.attentions = nnx.data(None)
        if attention is not None:
            self.attentions = nnx.List(
                [
                    _attention(attention, c_out, heads, layers[i], opts, kw)
                    for i in range(num_layers)
                ]
            )
        self.downsamplers = nnx.data(None)
        if add_downsample:
            self.downsamplers = nnx.List(
                [Downsample2D(c_out, out_channels=c_out, padding=downsample_padding, **kw)]
            )

    def __call__(self, x, temb=None, context=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _call_attn(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nnx.Module):
    """diffusers UNetMidBlock2D / UNetMidBlock2DCrossAttn: resnet, then (attention, resnet)."""

    def __init__(
        self, channels, *, attention, opts: BlockOptions, heads=1, transformer_layers=1,
        output_scale_factor=1.0, attn_groups=None, add_attention=True, rngs, dtype, param_dtype,
    ):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [_resnet(channels, channels, opts, kw, output_scale_factor) for _ in range(2)]
        )
        self.attentions = nnx.data(None)
        if add_attention and attention == "self":
            attn = _self_attention(channels, opts, attn_groups, kw)
            attn.rescale_output_factor = output_scale_factor
            self.attentions = nnx.List([attn])
        elif add_attention:
            self.attentions = nnx.List(
                [Transformer2DModel(channels, heads, transformer_layers, opts, **kw)]
            )

    def __call__(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = _call_attn(self.attentions[0], x, context)
        return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
    """One decoder stage: `num_layers` x (concat skip, resnet [+ attention]) then an optional
    nearest-2x + conv upsampler. skip=False gives the VAE's UpDecoderBlock2D (no skips)."""

    def __init__(
        self, c_in, c_prev, c_out, *, num_layers, attention, opts: BlockOptions, add_upsample,
        skip=True, heads=1, transformer_layers=1, rngs, dtype, param_dtype,
    ):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        layers = _per_layer(transformer_layers, num_layers)
        resnets = []
        for i in range(num_layers):
            c_res = (c_prev if i == 0 else c_out) if skip else (c_in if i == 0 else c_out)
            c_skip = (c_in if i == num_layers - 1 else c_out) if skip else 0
            resnets.append(_resnet(c_res + c_skip, c_out, opts, kw))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.data(None)
        if attention is not None:
            self.attentions = nnx.List(
                [
                    _attention(attention, c_out, heads, layers[i], opts, kw)
                    for i in range(num_layers)
                ]
            )
        self.upsamplers = nnx.data(None)
        if add_upsample:
            self.upsamplers = nnx.List([Upsample2D(c_out, out_channels=c_out, **kw)])
        self.pass_size = attention != "self"  # diffusers AttnUpBlock2D ignores upsample_size

    def __call__(self, x, skips=(), temb=None, context=None, upsample_size=None):
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            if skips:
                x = jnp.concatenate([x, skips.pop()], axis=-1)  # (B, H, W, C + C_skip)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _call_attn(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size if self.pass_size else None)
        return x


def _per_layer(value, num_layers) -> list[int]:
    """transformer_layers_per_block may be an int or one int per layer of the block."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) != num_layers:
        raise ValueError(f"transformer_layers {tuple(value)} must have {num_layers} entries")
    return list(value)
