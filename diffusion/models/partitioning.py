"""Logical-axis names for model code, and the helpers that attach them (one home for all models).

Model code names logical axes only; `diffusion/sharding.py` (LOGICAL_AXES, DEFAULT_RULES) maps
them to mesh axes. Names used on parameters (``nnx.Variable`` metadata ``out_sharding``):
  EMBED ('embed')  model width D (residual stream)     HEADS ('heads')  H * Dh of q/k/v projections
  MLP ('mlp')      hidden width of MLPs / modulations   VOCAB ('vocab')  token vocabulary
Names used on activations (via `constrain`): BATCH ('batch'), LENGTH ('length'), HEADS ('heads'),
KV ('kv', head_dim); the residual width of activations is left unconstrained (None): 'embed'
maps to the FSDP axis for parameters. Conv nets carry no names (FSDP-by-size shards them).

`remat_call` is the one rematerialisation helper (blocks of the U-Net, VAE, MMDiT and CLIP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from diffusion import sharding
from diffusion.models import layers

# The names model code uses; sharding.LOGICAL_AXES documents them (and the conv/image names).
BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB = (
    "batch",
    "length",
    "embed",
    "heads",
    "kv",
    "mlp",
    "vocab",
)
assert set((BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB)) <= set(sharding.LOGICAL_AXES)

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


def remat_call(module: nnx.Module, *args, remat: bool = False, **static):
    """`module(*args, **static)`, under `nnx.remat` (jax.checkpoint) when remat is True.

    `static` keyword arguments (e.g. an upsample size) are closed over, never traced.
    """
    if not remat:
        return module(*args, **static)
    return nnx.remat(lambda m, *a: m(*a, **static))(module, *args)
