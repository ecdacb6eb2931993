"""T5 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer") in Flax NNX: SD3's third text encoder (T5-XXL v1.1).

Mirrors transformers `T5EncoderModel` (attribute names shared, encoder.block[i].layer[0]
.SelfAttention.q/k/v/o, layer[1].DenseReluDense.wi_0/wi_1/wo, encoder.final_layer_norm), so
checkpoints load with `convert.load_torch_state_dict`. Differences from a standard transformer,
all as in the paper / transformers:
- pre-norm residual blocks with T5LayerNorm, an RMS norm without mean subtraction or bias
  (Zhang & Sennrich 2019), statistics in float32;
- no 1/sqrt(d) attention scale (folded into the initialisation);
- relative position bias (sec. 2.1): bucketed relative distances (half exact, half
  logarithmic up to `relative_attention_max_distance`), a learned scalar per bucket and head,
  computed in the first block and added to the logits of every block;
- feed-forward `relu` (T5 v1.0) or gated `gated-gelu` (T5 v1.1: gelu(wi_0 x) * wi_1 x;
  Shazeer 2020, "GLU Variants Improve Transformer").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import RMSNorm
from diffusion.models.partitioning import (
    BATCH,
    EMBED,
    HEADS,
    LENGTH,
    MLP,
    VOCAB,
    annotate,
    constrain,
    dense,
    remat_call,
)

ACTS = {
    "relu": jax.nn.relu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1 "gated-gelu"
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}
_HF_KEYS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
    "feed_forward_proj", "pad_token_id", "eos_token_id",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture fields of a transformers `T5Config` (encoder only) plus our `remat`.
    Defaults: T5-XXL v1.1, SD3's text_encoder_3."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1
    remat: bool = False

    def __post_init__(self):
        self.activation  # noqa: B018 (validates feed_forward_proj)

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers: "gated-gelu" runs gelu_new; any other "gated-ACT" / "ACT" runs ACT.
        act = self.feed_forward_proj.removeprefix("gated-")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act
        if act not in ACTS or self.feed_forward_proj.count("-") > 1:
            raise ValueError(
                f"unsupported feed_forward_proj {self.feed_forward_proj!r}; known: "
                f"{sorted(ACTS)} with or without the 'gated-' prefix"
            )
        return act

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> T5Config:
        """From a transformers T5Config config.json (generic keys and decoder fields ignored)."""
        if d.get("is_decoder"):
            raise ValueError("T5EncoderModel config has is_decoder=True")
        kw = {k: d[k] for k in _HF_KEYS if k in d and d[k] is not None}
        return cls(**{**kw, **overrides})

    def to_diffusers(self) -> dict:
        d = {k: getattr(self, k) for k in _HF_KEYS}
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "is_decoder": False,
                "is_encoder_decoder": False, "use_cache": False, **d}  # fmt: skip


def relative_position_bucket(relative_position, num_buckets: int, max_distance: int):
    """Bidirectional bucket of (key - query) distances (Raffel et al. 2020, sec. 2.1; Mesh
    TensorFlow `_relative_position_bucket`): half the buckets per direction, of which half are
    exact distances and half logarithmically spaced up to max_distance."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    # log(0) at distance 0 is masked by the `is_small` branch below.
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class T5Attention(nnx.Module):
    """transformers `T5Attention` (encoder self-attention, no 1/sqrt(d) scale)."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=False)
        inner = cfg.num_heads * cfg.d_kv
        self.cfg, self.heads = cfg, cfg.num_heads
        self.q = dense(cfg.d_model, inner, (EMBED, HEADS), **kw)
        self.k = dense(cfg.d_model, inner, (EMBED, HEADS), **kw)
        self.v = dense(cfg.d_model, inner, (EMBED, HEADS), **kw)
        self.o = dense(inner, cfg.d_model, (HEADS, EMBED), **kw)
        emb = None
        if has_relative_bias:
            emb = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype)  # fmt: skip
            emb = annotate(emb, (None, HEADS))
        self.relative_attention_bias = emb

    def position_bias(self, length: int) -> jax.Array:
        """(1, H, L, L) learned bias of the bucketed relative position (key - query)."""
        pos = jnp.arange(length)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],  # (Lq, Lk)
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(buckets)  # (Lq, Lk, H)
        return values.transpose(2, 0, 1)[None]  # (1, H, Lq, Lk)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1) for p in (self.q, self.k, self.v))
        # (B, L, H, Dh) each; logits without scaling, in float32 as transformers' softmax.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias  # (B, H, L, L)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, L, H, Dh)
        return self.o(out.reshape(b, n, -1))  # (B, L, D)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.SelfAttention = T5Attention(cfg, has_relative_bias, **kw)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def __call__(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseReluDense(nnx.Module):
    """transformers `T5DenseActDense` (wi, wo) or `T5DenseGatedActDense` (wi_0, wi_1, wo)."""

    def __init__(self, cfg: T5Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=False)
        self.act, self.gated = ACTS[cfg.activation], cfg.gated
        if cfg.gated:
            self.wi_0 = dense(cfg.d_model, cfg.d_ff, (EMBED, MLP), **kw)
            self.wi_1 = dense(cfg.d_model, cfg.d_ff, (EMBED, MLP), **kw)
        else:
            self.wi = dense(cfg.d_model, cfg.d_ff, (EMBED, MLP), **kw)
        self.wo = dense(cfg.d_ff, cfg.d_model, (MLP, EMBED), **kw)

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(constrain(h, (BATCH, LENGTH, MLP)))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.DenseReluDense = T5DenseReluDense(cfg, **kw)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer = nnx.List(
            [T5LayerSelfAttention(cfg, has_relative_bias, **kw), T5LayerFF(cfg, **kw)]
        )

    def __call__(self, x, bias):
        x = self.layer[1](self.layer[0](x, bias))
        return constrain(x, (BATCH, LENGTH, None))


class T5Stack(nnx.Module):
    """transformers `T5Stack` (encoder): blocks + final T5LayerNorm. The token embedding is
    the model's `shared` table (tied), so the stack holds none."""

    def __init__(self, cfg: T5Config, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = cfg.remat
        self.block = nnx.List([T5Block(cfg, i == 0, **kw) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def __call__(self, x, key_mask):
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])  # (1, H, L, L)
        if key_mask is not None:  # transformers: finfo.min added on padded keys
            bias = bias + jnp.where(key_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for block in self.block:
            x = remat_call(block, x, bias, remat=self.remat)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    """transformers `T5EncoderModel`: token ids -> last hidden state (B, L, d_model)."""

    diffusers_class = "T5EncoderModel"
    config_class = T5Config

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        shared = nnx.Embed(config.vocab_size, config.d_model, **kw)
        self.shared = annotate(shared, (VOCAB, EMBED))
        self.encoder = T5Stack(config, **kw)

    @staticmethod
    def torch_key_map(key: str) -> str | None:
        """`encoder.embed_tokens` is tied to `shared`: checkpoints may hold either or both."""
        return "shared.weight" if key == "encoder.embed_tokens.weight" else key

    def __call__(self, input_ids, attention_mask=None):
        """input_ids (B, L) int; attention_mask (B, L) 1 = token, 0 = padding (optional; SD3
        encodes without one). Returns (last_hidden_state (B, L, d_model),) as transformers'
        return_dict=False."""
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
            )
        x = constrain(self.shared(input_ids), (BATCH, LENGTH, None))  # (B, L, D)
        return (self.encoder(x, attention_mask),)
