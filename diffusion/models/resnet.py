"""Convolutional blocks of the U-Net and VAE (diffusers `models/resnet.py`, channels-last).

`ResnetBlock2D`, `Downsample2D` and `Upsample2D` mirror the diffusers modules of the same names,
parameter names included, so diffusers state dicts load without renames (see layers.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import Dtype, conv, get_activation, group_norm, linear


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` (DDPM/LDM residual block) in NHWC.

    norm1 -> act -> conv1 -> (+ time_emb_proj(act(temb)) if 'default') -> norm2
    (-> * (1 + scale) + shift if 'scale_shift') -> act -> conv2; skip through a 1x1
    `conv_shortcut` when channels change. Output (skip + h) / output_scale_factor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"unsupported time_embedding_norm {time_embedding_norm!r}; "
                "supported: 'default', 'scale_shift'"
            )
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        out_channels = out_channels or in_channels
        self.time_embedding_norm, self.output_scale_factor = (
            time_embedding_norm,
            output_scale_factor,
        )
        self.act = get_activation(non_linearity)
        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv(in_channels, out_channels, 3, **kw)
        self.time_emb_proj = nnx.data(None)
        if temb_channels is not None:
            mult = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = linear(temb_channels, mult * out_channels, **kw)
        self.norm2 = group_norm(out_channels, groups_out or groups, eps, **kw)
        self.conv2 = conv(out_channels, out_channels, 3, **kw)
        use_in_shortcut = (
            in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        )
        self.conv_shortcut = (
            conv(in_channels, out_channels, 1, bias=conv_shortcut_bias, **kw)
            if use_in_shortcut
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(self.act(self.norm1(x)))
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(self.act(temb))[:, None, None, :]  # (B, 1, 1, C or 2C)
        if self.time_embedding_norm == "default":
            h = self.norm2(h if t is None else h + t)
        else:
            if t is None:
                raise ValueError("ResnetBlock2D with time_embedding_norm='scale_shift' needs temb")
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.act(h))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """diffusers `Downsample2D`: stride-2 3x3 `conv` (padding 0 means pad right/bottom by one,
    as in the LDM VAE encoder), or 2x2 average pooling when use_conv is False."""

    def __init__(
        self,
        channels: int,
        *,
        use_conv: bool = True,
        out_channels: int | None = None,
        padding: int = 1,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.padding = padding
        self.conv = nnx.data(None)
        if use_conv:
            self.conv = conv(
                channels,
                out_channels or channels,
                3,
                stride=2,
                padding=padding,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is None:
            b, h, w, c = x.shape
            return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))  # (B, H/2, W/2, C)
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """torch F.interpolate(mode='nearest') in NHWC: 2x by default, else to `size` (H, W)."""
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]  # torch: floor(i * in / out)
    cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """diffusers `Upsample2D`: nearest-neighbour 2x (or to `output_size`) then a 3x3 `conv`."""

    def __init__(
        self,
        channels: int,
        *,
        use_conv: bool = True,
        out_channels: int | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.conv = nnx.data(None)
        if use_conv:
            self.conv = conv(
                channels,
                out_channels or channels,
                3,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return x if self.conv is None else self.conv(x)
