"""CLIP text encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision") in Flax NNX: the prompt encoder of Stable Diffusion 1.x/2.x/XL/3.

Mirrors transformers `CLIPTextModel` / `CLIPTextModelWithProjection` (attribute names
embeddings.token_embedding, encoder.layers[i].self_attn.q_proj, mlp.fc1, final_layer_norm,
text_projection), so checkpoints load with `convert.load_torch_state_dict`. Pre-LN transformer
with a causal mask; the pooled output is the final-layer-normed state at the EOS token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models import layers
from diffusion.models.layers import layer_norm
from diffusion.models.partitioning import (
    BATCH,
    EMBED,
    HEADS,
    KV,
    LENGTH,
    MLP,
    VOCAB,
    annotate,
    constrain,
    dense,
    remat_call,
)

HIDDEN_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP (SD 2.x, SDXL's bigG)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
CLASS_NAMES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
    "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
# Options of transformers' CLIPTextConfig that change the forward pass when not at these values.
_REQUIRED = {"dropout": 0.0, "attention_dropout": 0.0, "model_type": "clip_text_model"}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture fields of a transformers `CLIPTextConfig` plus attn_implementation / remat.

    eos_token_id: 2 selects the legacy pooling (argmax of input_ids, i.e. the highest token id,
    as in configs written before transformers PR #24773); any other value pools at the first
    position equal to eos_token_id.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    class_name: str = "CLIPTextModel"  # or "CLIPTextModelWithProjection" (config.json's class)
    attn_implementation: str | None = None
    remat: bool = False

    def __post_init__(self):
        if self.class_name not in CLASS_NAMES:
            raise ValueError(f"unsupported class {self.class_name!r}; known: {CLASS_NAMES}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; known: {list(HIDDEN_ACTS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> CLIPTextConfig:
        """From a transformers CLIPTextConfig config.json dict (generic PretrainedConfig keys such
        as `architectures`, `initializer_range`, `dtype` are ignored)."""
        bad = [f"{k}={d[k]!r}" for k, want in _REQUIRED.items() if k in d and d[k] != want]
        if bad:
            raise ValueError(f"unsupported CLIPTextConfig options {bad}; need {_REQUIRED}")
        kw = {k: d[k] for k in _HF_KEYS if k in d and d[k] is not None}
        names = d.get("architectures") or [d.get("_class_name", "CLIPTextModel")]
        return cls(**{**kw, "class_name": names[0], **overrides})

    def to_diffusers(self) -> dict:
        d = {k: getattr(self, k) for k in _HF_KEYS}
        return {"_class_name": self.class_name, "architectures": [self.class_name],
                "model_type": "clip_text_model", **d}  # fmt: skip


class CLIPTextEmbeddings(nnx.Module):
    """transformers `CLIPTextEmbeddings`: token embedding + learned absolute positions."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.token_embedding = annotate(nnx.Embed(cfg.vocab_size, d, **kw), (VOCAB, EMBED))
        pos = nnx.Embed(cfg.max_position_embeddings, d, **kw)
        self.position_embedding = annotate(pos, (None, EMBED))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        n = input_ids.shape[-1]
        max_len = self.position_embedding.num_embeddings
        if n > max_len:
            raise ValueError(f"input_ids length {n} exceeds max_position_embeddings {max_len}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(n))[None]


class CLIPAttention(nnx.Module):
    """transformers `CLIPAttention`: multi-head self-attention with q/k/v/out projections."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.hidden_size
        self.heads, self.impl = cfg.num_attention_heads, cfg.attn_implementation
        self.k_proj = dense(d, d, (EMBED, HEADS), **kw)
        self.v_proj = dense(d, d, (EMBED, HEADS), **kw)
        self.q_proj = dense(d, d, (EMBED, HEADS), **kw)
        self.out_proj = dense(d, d, (HEADS, EMBED), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = (
            p(x).reshape(b, n, self.heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k, v = (constrain(t, (BATCH, LENGTH, HEADS, KV)) for t in (q, k, v))  # (B, L, H, Dh)
        out = layers.dot_product_attention(q, k, v, mask=mask, implementation=self.impl)
        return self.out_proj(out.reshape(b, n, d))  # (B, L, D)


class CLIPMLP(nnx.Module):
    """transformers `CLIPMLP`: fc1 -> activation -> fc2."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = HIDDEN_ACTS[cfg.hidden_act]
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, (EMBED, MLP), **kw)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, (MLP, EMBED), **kw)

    def __call__(self, x):
        h = constrain(self.act(self.fc1(x)), (BATCH, LENGTH, MLP))
        return self.fc2(h)


class CLIPEncoderLayer(nnx.Module):
    """transformers `CLIPEncoderLayer`: pre-LN residual attention + MLP."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm_kw = dict(affine=True, **kw)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **norm_kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **norm_kw)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, (BATCH, LENGTH, None))


class CLIPEncoder(nnx.Module):
    """transformers `CLIPEncoder`: the stack of encoder layers."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = cfg.remat
        self.layers = nnx.List([CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, mask) -> list[jax.Array]:
        """Returns all hidden states: [embeddings, layer 1 output, ..., layer N output]."""
        states = [x]
        for layer in self.layers:
            states.append(remat_call(layer, states[-1], mask, remat=self.remat))
        return states


def _attention_mask(input_ids, attention_mask):
    """Causal mask, AND the key padding mask if given: boolean (B or 1, 1, L, L), True = attend."""
    n = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]  # (1, 1, L, L)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}"
            )
        mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]  # (B, 1, L, L)
    return mask


class CLIPTextModel(nnx.Module):
    """transformers `CLIPTextModel` (its inner `CLIPTextTransformer`): prompt -> token states."""

    diffusers_class = "CLIPTextModel"
    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # The config names the class in config.json (save_diffusers); make it this one.
        self.config = config = dataclasses.replace(config, class_name=self.diffusers_class)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = layer_norm(
            config.hidden_size, config.layer_norm_eps, affine=True, **kw
        )

    @staticmethod
    def torch_key_map(key: str) -> str | None:
        """Checkpoints prefix keys with `text_model.` (transformers < 5); position_ids is a
        buffer."""
        return None if key.endswith("position_ids") else key.removeprefix("text_model.")

    @staticmethod
    def torch_key_unmap(key: str) -> str:
        """Write prefixed keys: readable by transformers 4 and 5."""
        return "text_model." + key

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states=False):
        """input_ids (B, L) int; attention_mask (B, L) 1 = token, 0 = padding (right padding).

        Returns (last_hidden_state (B, L, D), pooled_output (B, D)), plus the tuple of all
        hidden states (embeddings, then each layer's output before the final LayerNorm; SDXL
        uses hidden_states[-2]) when output_hidden_states, as transformers' return_dict=False.
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
        x = constrain(self.embeddings(input_ids), (BATCH, LENGTH, None))
        states = self.encoder(x, _attention_mask(input_ids, attention_mask))
        last = self.final_layer_norm(states[-1])
        if self.config.eos_token_id == 2:  # legacy configs: EOS has the highest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # first EOS (the pad token may equal the EOS token)
            eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos]  # (B, D)
        return (last, pooled, tuple(states)) if output_hidden_states else (last, pooled)


class CLIPTextModelWithProjection(nnx.Module):
    """transformers `CLIPTextModelWithProjection`: CLIPTextModel + bias-free text_projection of
    the pooled output (SDXL's second and SD3's CLIP encoders)."""

    diffusers_class = "CLIPTextModelWithProjection"
    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config = dataclasses.replace(config, class_name=self.diffusers_class)
        self.text_model = CLIPTextModel(config, **kw)
        self.text_projection = dense(
            config.hidden_size, config.projection_dim, (EMBED, None), bias=False, **kw
        )

    @staticmethod
    def torch_key_map(key: str) -> str | None:
        return None if key.endswith("position_ids") else key

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states=False):
        """Returns (text_embeds (B, P), last_hidden_state (B, L, D)) plus all hidden states
        when output_hidden_states (transformers' CLIPTextModelOutput order)."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return (self.text_projection(out[1]), out[0], *out[2:])
