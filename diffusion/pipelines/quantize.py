"""int8 weight-only quantization of a module state (symmetric, per output channel).

Each Linear / Conv kernel with at least `min_size` elements is stored as int8 q and a float32
scale per output channel (the last axis: (in, out) / (kh, kw, in, out)),

    scale = max |W[..., c]| / 127,    q = round(W / scale),    W_hat = q * scale,

(the absmax scheme of LLM.int8's vector-wise quantization without the outlier split, Dettmers et
al. 2022). Biases, norms and embeddings stay float. The generation program dequantizes inside
the jitted function, so the weights cross host -> device and live in device memory as int8;
`benchmark_pipeline.py` measures the argument bytes and the output difference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    q: jax.Array  # int8, the kernel's shape
    scale: jax.Array  # float32, (out,)

    @property
    def shape(self):
        return self.q.shape


def _is_kernel(path) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "kernel" in names[-2:]


def quantize_array(w) -> Int8Weight:
    w = jnp.asarray(w, jnp.float32)
    absmax = jnp.max(jnp.abs(w.reshape(-1, w.shape[-1])), axis=0)  # (out,)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale)


def quantize_int8(state, *, min_size: int = 1024):
    """The state with every kernel of >= min_size elements replaced by an Int8Weight (one
    compiled program for the whole state; works on abstract states under jax.eval_shape)."""
    return _quantize_jit(state, min_size)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_jit(state, min_size):
    def leaf(path, x):
        if _is_kernel(path) and x.ndim >= 2 and x.size >= min_size:
            return quantize_array(x)
        return x

    return jax.tree_util.tree_map_with_path(leaf, state)


def dequantize(state, dtype=jnp.float32):
    """Inverse of quantize_int8 (up to rounding): W_hat = q * scale."""
    return jax.tree.map(
        lambda x: (x.q.astype(dtype) * x.scale.astype(dtype)) if isinstance(x, Int8Weight) else x,
        state,
        is_leaf=lambda x: isinstance(x, Int8Weight),
    )


def nbytes(state) -> int:
    """Bytes of all arrays in a (possibly quantized) state."""
    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
