"""Adaptive layer norms of DiT / MMDiT (Peebles & Xie 2023; Esser et al. 2024, SD3) in Flax NNX.

Mirrors diffusers `normalization.AdaLayerNormZero`, `SD35AdaLayerNormZeroX` and
`AdaLayerNormContinuous`: a `linear` maps SiLU(conditioning) to shift/scale/gate vectors that
modulate a `norm` (LayerNorm, usually without affine parameters). Chunk orders follow diffusers
exactly, since the checkpoint's `linear` rows are laid out in that order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import layer_norm
from diffusion.models.partitioning import EMBED, MLP, dense


def _modulate(x, shift, scale):
    """x * (1 + scale) + shift with (B, D) modulation broadcast over the sequence axis."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLayerNormZero(nnx.Module):
    """diffusers `AdaLayerNormZero` (adaLN-Zero, DiT): 6 modulation vectors from `emb`.

    Returns (norm(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
    """

    def __init__(
        self, embedding_dim, *, bias=True, rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear = dense(embedding_dim, 6 * embedding_dim, (EMBED, MLP), bias=bias, **kw)
        self.norm = layer_norm(embedding_dim, 1e-6, **kw)

    def __call__(self, x: jax.Array, emb: jax.Array):
        emb = self.linear(jax.nn.silu(emb))  # (B, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(emb, 6, axis=-1)
        x = _modulate(self.norm(x), shift_msa, scale_msa)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class SD35AdaLayerNormZeroX(nnx.Module):
    """diffusers `SD35AdaLayerNormZeroX` (SD3.5 MMDiT-X): adaLN-Zero with a second attention branch.

    Returns (x_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_msa2, gate_msa2), where both
    modulated inputs share one LayerNorm of x.
    """

    def __init__(
        self, embedding_dim, *, bias=True, rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear = dense(embedding_dim, 9 * embedding_dim, (EMBED, MLP), bias=bias, **kw)
        self.norm = layer_norm(embedding_dim, 1e-6, **kw)

    def __call__(self, x: jax.Array, emb: jax.Array):
        emb = self.linear(jax.nn.silu(emb))  # (B, 9D)
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
         gate_msa2) = jnp.split(emb, 9, axis=-1)  # fmt: skip
        normed = self.norm(x)
        x_msa = _modulate(normed, shift_msa, scale_msa)
        x_msa2 = _modulate(normed, shift_msa2, scale_msa2)
        return x_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_msa2, gate_msa2


class AdaLayerNormContinuous(nnx.Module):
    """diffusers `AdaLayerNormContinuous` (layer_norm type): norm(x) * (1 + scale) + shift.

    Note the chunk order is (scale, shift) here, unlike the adaLN-Zero layers.
    """

    def __init__(
        self,
        embedding_dim: int,
        conditioning_embedding_dim: int,
        *,
        elementwise_affine: bool = True,
        eps: float = 1e-5,
        bias: bool = True,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear = dense(
            conditioning_embedding_dim, 2 * embedding_dim, (EMBED, MLP), bias=bias, **kw
        )
        self.norm = layer_norm(embedding_dim, eps, affine=elementwise_affine, bias=bias, **kw)

    def __call__(self, x: jax.Array, conditioning_embedding: jax.Array) -> jax.Array:
        emb = self.linear(jax.nn.silu(conditioning_embedding).astype(x.dtype))  # (B, 2D)
        scale, shift = jnp.split(emb, 2, axis=-1)
        return _modulate(self.norm(x), shift, scale)
