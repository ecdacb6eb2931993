"""Building blocks shared by the U-Net, VAE and MMDiT (channels-last Flax NNX).

Each module mirrors a diffusers PyTorch module: attribute names match the torch parameter names
(`to_q`, `to_out[0]`, `net[0].proj`, `norm1`, `conv_shortcut`, ...) so that
`convert.load_torch_state_dict` maps a diffusers state dict onto these modules without renames.
All modules take `dtype` (compute dtype) and `param_dtype` (storage dtype) separately so that
bf16 compute with fp32 master weights works.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu-approximate": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """diffusers `get_activation`: activation function by name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def linear(d_in, d_out, *, rngs, bias=True, dtype=jnp.float32, param_dtype=jnp.float32):
    """nnx.Linear with the (dtype, param_dtype) pair threaded through."""
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conv(c_in, c_out, k, *, rngs, stride=1, padding=None, bias=True, dtype, param_dtype):
    """nnx.Conv with torch-style symmetric integer padding (default k // 2)."""
    p = k // 2 if padding is None else padding
    return nnx.Conv(
        c_in,
        c_out,
        (k, k),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def group_norm(c, groups, eps, *, rngs, dtype, param_dtype):
    """torch.nn.GroupNorm over the channel (last) axis; statistics in fp32 (two-pass variance)."""
    return nnx.GroupNorm(
        c,
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(dim, eps, *, rngs, affine=False, bias=True, dtype, param_dtype):
    """torch nn.LayerNorm over the last axis (two-pass variance, stats in fp32 as in torch)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_scale=affine,
        use_bias=affine and bias,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps torch ModuleList indices aligned (e.g. Dropout)."""

    def __call__(self, x):
        return x


# ----------------------------------------------------------------------------- time embeddings


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000,
) -> jax.Array:
    """Sinusoidal timestep embedding (DDPM, Ho et al. 2020), diffusers `get_timestep_embedding`.

    t: (B,) possibly fractional timesteps (a scalar is broadcast to (1,)). Returns (B, dim) fp32.
    """
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - downscale_freq_shift))  # (half,)
    args = scale * (t[:, None] * freqs[None, :])  # (B, half)
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2 (MLP on sinusoids)."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        out_dim: int | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = linear(in_channels, time_embed_dim, **kw)
        self.act = get_activation(act_fn)
        self.linear_2 = linear(time_embed_dim, out_dim or time_embed_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------- attention


def dot_product_attention(q, k, v, *, mask=None, implementation=None):
    """Softmax attention on (B, L, H, Dh) tensors with scale 1/sqrt(Dh) (Vaswani et al. 2017).

    implementation: None (let JAX choose), 'xla' or 'cudnn' (flash attention on GPU).
    mask: optional boolean, broadcastable to (B, H, Lq, Lk); True = attend.
    """
    if implementation not in (None, "xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {implementation!r}; use None/xla/cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class RMSNorm(nnx.Module):
    """diffusers `RMSNorm` (Zhang & Sennrich 2019): x / rms(x) * scale (+ bias), stats in fp32."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        elementwise_affine: bool = True,
        bias: bool = False,
        rngs: nnx.Rngs | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if elementwise_affine else None
        self.bias = (
            nnx.Param(jnp.zeros((dim,), param_dtype)) if (elementwise_affine and bias) else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            x32 = x32 * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x32 = x32 + self.bias[...].astype(jnp.float32)
        return x32.astype(self.dtype)


class _ProjAct(nnx.Module):
    """diffusers GELU / GEGLU / ApproximateGELU: `proj` Linear followed by a (gated) activation."""

    def __init__(self, d_in, d_out, kind, *, bias, rngs, dtype, param_dtype):
        gated = kind in ("geglu", "swiglu")
        self.kind = kind
        self.proj = linear(
            d_in,
            d_out * (2 if gated else 1),
            bias=bias,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x):
        h = self.proj(x)
        if self.kind == "gelu":
            return jax.nn.gelu(h, approximate=False)
        if self.kind == "gelu-approximate":
            return jax.nn.gelu(h, approximate=True)
        if self.kind == "geglu-approximate":  # diffusers ApproximateGELU: x * sigmoid(1.702 x)
            return h * jax.nn.sigmoid(1.702 * h)
        h, gate = jnp.split(h, 2, axis=-1)  # hidden first, gate second (as torch .chunk(2))
        act = jax.nn.silu(gate) if self.kind == "swiglu" else jax.nn.gelu(gate, approximate=False)
        return h * act


FF_ACTIVATIONS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu")


class FeedForward(nnx.Module):
    """diffusers `FeedForward`: net[0] = proj+activation, net[1] = dropout, net[2] = Linear."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        mult: float = 4,
        activation_fn: str = "geglu",
        inner_dim: int | None = None,
        bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        if activation_fn not in FF_ACTIVATIONS:
            raise ValueError(
                f"unknown FeedForward activation_fn {activation_fn!r}; known: {FF_ACTIVATIONS}"
            )
        inner = inner_dim if inner_dim is not None else int(dim * mult)
        kw = dict(bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List(
            [
                _ProjAct(dim, inner, activation_fn, **kw),
                Identity(),
                linear(inner, dim_out or dim, **kw),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class Attention(nnx.Module):
    """diffusers `Attention` (AttnProcessor2_0 semantics) on (B, L, D) or NHWC inputs.

    Self-attention when `encoder_hidden_states` is None, else cross-attention to it
    (`cross_attention_dim` sets the key/value input width). With `norm_num_groups` a GroupNorm
    (`group_norm`) is applied to the query input first (VAE / UNet2DModel attention blocks);
    4-D NHWC inputs are flattened to (B, H*W, C) and restored. Output:
    (to_out[0](attn) [+ input if residual_connection]) / rescale_output_factor.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        *,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        out_dim: int | None = None,
        attn_implementation: str | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = dim_head * heads
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads, self.residual_connection = heads, residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.attn_implementation = attn_implementation
        self.group_norm = (
            group_norm(query_dim, norm_num_groups, eps, **kw) if norm_num_groups else None
        )
        self.to_q = linear(query_dim, inner, bias=bias, **kw)
        self.to_k = linear(kv_dim, inner, bias=bias, **kw)
        self.to_v = linear(kv_dim, inner, bias=bias, **kw)
        self.to_out = nnx.List([linear(inner, out_dim or query_dim, bias=out_bias, **kw)])

    def __call__(self, hidden_states, encoder_hidden_states=None, *, mask=None):
        x = hidden_states
        if self.group_norm is not None:
            x = self.group_norm(x)  # per-channel groups; same for NHWC and (B, L, C)
        spatial = x.shape if x.ndim == 4 else None
        if spatial is not None:
            x = x.reshape(spatial[0], -1, spatial[3])  # (B, H*W, C)
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        b, lq, lk, h = x.shape[0], x.shape[1], ctx.shape[1], self.heads
        q = self.to_q(x).reshape(b, lq, h, -1)  # (B, Lq, H, Dh)
        k = self.to_k(ctx).reshape(b, lk, h, -1)  # (B, Lk, H, Dh)
        v = self.to_v(ctx).reshape(b, lk, h, -1)  # (B, Lk, H, Dh)
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.attn_implementation)
        out = self.to_out[0](out.reshape(b, lq, -1))  # (B, Lq, D)
        if spatial is not None:
            out = out.reshape(spatial[:3] + out.shape[-1:])  # (B, H, W, C)
        if self.residual_connection:
            out = out + hidden_states
        return out / self.rescale_output_factor
