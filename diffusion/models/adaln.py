"""Adaptive layer norms of DiT / MMDiT (Peebles & Xie 2023; Esser et al. 2024, SD3) in Flax NNX.

Mirrors diffusers `normalization.AdaLayerNormZero`, `SD35AdaLayerNormZeroX` and
`AdaLayerNormContinuous`: a `linear` maps SiLU(conditioning) to shift/scale/gate vectors that
modulate a `norm` (LayerNorm, usually without affine parameters). Chunk orders follow diffusers
exactly, since the checkpoint's `linear` rows are laid out in that order.

This file also holds the logical-axis helpers shared by mmdit.py and text.py: model code names
logical axes only; `diffusion/sharding.py` maps them to mesh axes.

Logical names used on parameters (``nnx.Variable`` metadata ``out_sharding``):
  EMBED ('embed')  model width D (residual stream)     HEADS ('heads')  H * Dh of q/k/v projections
  MLP ('mlp')      hidden width of MLPs / modulations   VOCAB ('vocab')  token vocabulary
Logical names used on activations (via `constrain`):
  BATCH ('batch'), LENGTH ('length'), HEADS ('heads'), KV ('kv', head_dim); the residual width
  of activations is left unconstrained (None): 'embed' maps to the FSDP axis for parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from diffusion import sharding
from diffusion.models import layers

BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB = (
    "batch",
    "length",
    "embed",
    "heads",
    "kv",
    "mlp",
    "vocab",
)
LOGICAL_AXES = (BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB)

Names = tuple[str | None, ...]


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """Sharding constraint on an activation by logical axis names.

    Active only inside `nnx.logical_axis_rules(rules)` *and* a mesh context
    (`jax.set_mesh(mesh)`); otherwise (single device, no mesh) it is a no-op. Names resolve
    with `sharding.logical_to_spec` (each mesh axis used once, indivisible dims unsharded).
    """
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {names} do not match activation shape {x.shape}")
    spec = sharding.logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def annotate(module: nnx.Module, kernel_names: Names) -> nnx.Module:
    """Attach logical sharding names to a Linear/Conv/Embed's parameters (bias: output name).

    Metadata only (`eager_sharding=False`): nothing is placed on devices here; sharding.py turns
    the names into a PartitionSpec tree with `nnx.get_partition_spec` under its rules.
    """
    for leaf in ("kernel", "embedding"):
        var = getattr(module, leaf, None)
        if isinstance(var, nnx.Variable):
            var.set_metadata(out_sharding=tuple(kernel_names), eager_sharding=False)
    bias = getattr(module, "bias", None)
    if isinstance(bias, nnx.Variable):
        bias.set_metadata(out_sharding=(kernel_names[-1],), eager_sharding=False)
    return module


def dense(
    d_in, d_out, names: Names, *, rngs, bias=True, dtype=jnp.float32, param_dtype=jnp.float32
):
    """nnx.Linear (torch nn.Linear) whose kernel (in, out) carries logical names `names`."""
    lin = layers.linear(d_in, d_out, rngs=rngs, bias=bias, dtype=dtype, param_dtype=param_dtype)
    return annotate(lin, names)


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
