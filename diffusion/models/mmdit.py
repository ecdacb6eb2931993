"""MMDiT: the Stable Diffusion 3 / 3.5 transformer (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis") in Flax NNX, channels-last.

Mirrors diffusers `SD3Transformer2DModel` (attribute names and forward arguments), so a diffusers
checkpoint loads with `convert.load_torch_state_dict` and outputs match the PyTorch reference:
  pos_embed (PatchEmbed, cropped 2D sin-cos) -> time_text_embed (timestep + pooled text) ->
  context_embedder -> transformer_blocks (JointTransformerBlock, joint attention over
  [image tokens, text tokens]) -> norm_out (AdaLayerNormContinuous) -> proj_out -> unpatchify.
SD3.5 additions: `qk_norm="rms_norm"` and `dual_attention_layers` (MMDiT-X: a second,
image-only self-attention `attn2` modulated by `SD35AdaLayerNormZeroX`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.models import layers
from diffusion.models.adaln import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from diffusion.models.layers import layer_norm
from diffusion.models.partitioning import (
    BATCH,
    EMBED,
    HEADS,
    KV,
    LENGTH,
    MLP,
    annotate,
    constrain,
    dense,
    remat_call,
)

QK_NORMS = (None, "rms_norm")
_DIFFUSERS_KEYS = (
    "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
    "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
    "pooled_projection_dim", "out_channels", "pos_embed_max_size", "dual_attention_layers",
    "qk_norm",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Constructor arguments of diffusers `SD3Transformer2DModel` plus two JAX-only options.

    attn_implementation: `layers.dot_product_attention` implementation (None / 'xla' / 'cudnn').
    remat: wrap each transformer block in `nnx.remat` (recompute activations in the backward).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    attn_implementation: str | None = None
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unsupported qk_norm {self.qk_norm!r}; supported: {QK_NORMS}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim})"
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"dual_attention_layers {bad} outside range(num_layers={self.num_layers})"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> MMDiTConfig:
        """From a diffusers config.json dict; `overrides` sets attn_implementation / remat."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - set(_DIFFUSERS_KEYS))
        if unknown:
            raise ValueError(f"unsupported SD3Transformer2DModel options {unknown}")
        return cls(**d, **overrides)

    def to_diffusers(self) -> dict:
        d = {k: getattr(self, k) for k in _DIFFUSERS_KEYS}
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": SD3Transformer.diffusers_class, **d}


@functools.lru_cache(maxsize=32)
def _sincos_2d(dim: int, rows: tuple, cols: tuple) -> np.ndarray:
    """diffusers `get_2d_sincos_pos_embed_from_grid` for explicit row/col coordinates.

    Returns (len(rows) * len(cols), dim) float32, tokens in row-major order; the first half of
    the channels encodes the column (x) coordinate, the second half the row (y) coordinate.
    """

    def one_d(d, pos):  # (M,) -> (M, d): [sin(pos * omega), cos(pos * omega)]
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(np.asarray(pos, np.float64), omega)  # (M, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    yy, xx = np.meshgrid(np.asarray(rows), np.asarray(cols), indexing="ij")  # (h, w)
    emb = np.concatenate([one_d(dim // 2, xx.reshape(-1)), one_d(dim // 2, yy.reshape(-1))], 1)
    return emb.astype(np.float32)


def _grid(n: int, base_size: int) -> tuple:
    """Grid coordinates as diffusers computes them: arange(n) / (n / base_size), in float32."""
    return tuple(np.arange(n, dtype=np.float32) / np.float32(n / base_size))


class PatchEmbed(nnx.Module):
    """diffusers `PatchEmbed` (SD3 variant): strided conv + fixed 2D sin-cos positions.

    With `pos_embed_max_size` the positions come from a (max, max) grid cropped at the centre
    to the latent's (h, w) patches. The positions are computed, not learned: the checkpoint's
    `pos_embed.pos_embed` buffer is ignored on load (`SD3Transformer.torch_key_map`) and
    written on save (`SD3Transformer.torch_persistent_buffers`).
    """

    def __init__(self, cfg: MMDiTConfig, *, rngs, dtype, param_dtype):
        p, dim = cfg.patch_size, cfg.inner_dim
        self.patch_size, self.max_size, self.dtype = p, cfg.pos_embed_max_size, dtype
        self.base_size = cfg.sample_size // p
        conv = nnx.Conv(cfg.in_channels, dim, (p, p), strides=(p, p), padding="VALID",
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # fmt: skip
        self.proj = annotate(conv, (None, None, None, EMBED))

    def positions(self, h: int, w: int, dim: int) -> np.ndarray:
        """(h * w, dim) sin-cos positions for an (h, w)-patch latent."""
        m = self.max_size
        if m is None:
            return _sincos_2d(dim, _grid(h, self.base_size), _grid(w, self.base_size))
        if h > m or w > m:
            raise ValueError(f"latent of {h}x{w} patches exceeds pos_embed_max_size={m}")
        top, left = (m - h) // 2, (m - w) // 2
        grid = _grid(m, self.base_size)
        return _sincos_2d(dim, grid[top : top + h], grid[left : left + w])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)  # (B, h, w, D)
        b, h, w, dim = x.shape
        pos = jnp.asarray(self.positions(h, w, dim))
        return (x.reshape(b, h * w, dim) + pos[None]).astype(self.dtype)  # (B, h*w, D)


class PixArtAlphaTextProjection(nnx.Module):
    """diffusers `PixArtAlphaTextProjection` with act_fn='silu': linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_features, hidden_size, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = dense(in_features, hidden_size, (None, MLP), **kw)
        self.linear_2 = dense(hidden_size, hidden_size, (MLP, EMBED), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """diffusers `CombinedTimestepTextProjEmbeddings`: MLP(sinusoid(t)) + MLP(pooled text)."""

    def __init__(self, dim, pooled_projection_dim, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype
        self.timestep_embedder = layers.TimestepEmbedding(256, dim, **kw)
        annotate(self.timestep_embedder.linear_1, (None, MLP))
        annotate(self.timestep_embedder.linear_2, (MLP, EMBED))
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, dim, **kw)

    def __call__(self, timestep, pooled_projection):
        t = layers.timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        t_emb = self.timestep_embedder(t.astype(self.dtype))  # (B, D)
        return t_emb + self.text_embedder(pooled_projection.astype(self.dtype))


class JointAttention(nnx.Module):
    """diffusers `Attention` with `JointAttnProcessor2_0`.

    joint=True: image (to_q/k/v) and text (add_q/k/v_proj) tokens attend together and are split
    back (to_out[0], to_add_out). joint=False: plain self-attention (the SD3.5 `attn2`).
    """

    def __init__(self, dim, heads, head_dim, *, joint, context_pre_only, qk_norm, impl, rngs,
                 dtype, param_dtype):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * head_dim
        self.heads, self.impl = heads, impl
        self.to_q, self.to_k, self.to_v = (dense(dim, inner, (EMBED, HEADS), **kw) for _ in "qkv")
        self.to_out = nnx.List([dense(inner, dim, (HEADS, EMBED), **kw), layers.Identity()])

        def norm():
            return layers.RMSNorm(head_dim, 1e-6, **kw) if qk_norm else None

        def proj(out_names):
            return dense(dim, inner, out_names, **kw) if joint else None

        self.norm_q, self.norm_k = norm(), norm()
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (proj((EMBED, HEADS)) for _ in "qkv")
        self.norm_added_q = norm() if joint else None
        self.norm_added_k = norm() if joint else None
        has_add_out = joint and not context_pre_only
        self.to_add_out = dense(inner, dim, (HEADS, EMBED), **kw) if has_add_out else None

    def _qkv(self, x, proj_q, proj_k, proj_v, norm_q, norm_k):
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1) for p in (proj_q, proj_k, proj_v))
        q = norm_q(q) if norm_q is not None else q  # (B, N, H, Dh)
        k = norm_k(k) if norm_k is not None else k
        return q, k, v

    def __call__(self, x, context=None):
        b, n_x, _ = x.shape
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)  # fmt: skip
            q, k, v = (jnp.concatenate(t, axis=1) for t in ((q, cq), (k, ck), (v, cv)))
        q, k, v = (constrain(t, (BATCH, LENGTH, HEADS, KV)) for t in (q, k, v))
        out = layers.dot_product_attention(q, k, v, implementation=self.impl)  # (B, N, H, Dh)
        out = out.reshape(b, out.shape[1], -1)  # (B, N, H*Dh)
        x_out = self.to_out[0](out[:, :n_x])
        if context is None:
            return x_out
        c_out = out[:, n_x:]
        return x_out, (self.to_add_out(c_out) if self.to_add_out is not None else c_out)


def _feed_forward(dim, **kw):
    """diffusers FeedForward(dim, dim, activation_fn='gelu-approximate') with sharding names."""
    ff = layers.FeedForward(dim, dim, activation_fn="gelu-approximate", **kw)
    annotate(ff.net[0].proj, (EMBED, MLP))
    annotate(ff.net[2], (MLP, EMBED))
    return ff


def _gated(x, gate, y):
    return x + gate[:, None, :] * y


class JointTransformerBlock(nnx.Module):
    """diffusers `JointTransformerBlock` (MMDiT block, SD3 paper Fig. 2b; SD3.5 MMDiT-X).

    The last block is `context_pre_only`: its text stream only feeds the joint attention, so it
    has no to_add_out / norm2_context / ff_context and returns context=None.
    """

    def __init__(self, cfg: MMDiTConfig, *, context_pre_only, use_dual_attention, rngs, dtype,
                 param_dtype):  # fmt: skip
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only, self.use_dual_attention = context_pre_only, use_dual_attention
        self.norm1 = (SD35AdaLayerNormZeroX if use_dual_attention else AdaLayerNormZero)(dim, **kw)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, elementwise_affine=False,
                                                        eps=1e-6, **kw)  # fmt: skip
        else:
            self.norm1_context = AdaLayerNormZero(dim, **kw)
        attn_kw = dict(qk_norm=cfg.qk_norm, impl=cfg.attn_implementation, **kw)
        self.attn = JointAttention(dim, heads, hd, joint=True, context_pre_only=context_pre_only,
                                   **attn_kw)  # fmt: skip
        self.attn2 = (
            JointAttention(dim, heads, hd, joint=False, context_pre_only=None, **attn_kw)
            if use_dual_attention
            else None
        )
        self.norm2 = layer_norm(dim, 1e-6, **kw)
        self.ff = _feed_forward(dim, **kw)
        # Attributes are assigned once: NNX fixes an attribute as data/static on first assignment.
        self.norm2_context = None if context_pre_only else layer_norm(dim, 1e-6, **kw)
        self.ff_context = None if context_pre_only else _feed_forward(dim, **kw)

    def __call__(self, x, context, temb):
        if self.use_dual_attention:
            x_n, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_n2, gate_msa2 = self.norm1(x, temb)
        else:
            x_n, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            c_n = self.norm1_context(context, temb)
        else:
            c_n, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                context, temb
            )

        attn_x, attn_c = self.attn(x_n, c_n)
        x = _gated(x, gate_msa, attn_x)
        if self.attn2 is not None:
            x = _gated(x, gate_msa2, self.attn2(x_n2))
        x_n = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = constrain(_gated(x, gate_mlp, self.ff(x_n)), (BATCH, LENGTH, None))
        if self.context_pre_only:
            return None, x

        context = _gated(context, c_gate_msa, attn_c)
        c_n = self.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        context = constrain(
            _gated(context, c_gate_mlp, self.ff_context(c_n)), (BATCH, LENGTH, None)
        )
        return context, x


class SD3Transformer(nnx.Module):
    """diffusers `SD3Transformer2DModel` (SD3 / SD3.5 MMDiT), NHWC in and out."""

    diffusers_class = "SD3Transformer2DModel"
    config_class = MMDiTConfig

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):  # fmt: skip
        cfg = self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg, **kw)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, cfg.pooled_projection_dim, **kw
        )
        self.context_embedder = dense(cfg.joint_attention_dim, cfg.caption_projection_dim,
                                      (None, EMBED), **kw)  # fmt: skip
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(cfg, context_pre_only=i == cfg.num_layers - 1,
                                      use_dual_attention=i in cfg.dual_attention_layers, **kw)
                for i in range(cfg.num_layers)
            ]
        )  # fmt: skip
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, **kw)
        p = cfg.patch_size
        self.proj_out = dense(dim, p * p * cfg.out_dim, (EMBED, None), **kw)

    @staticmethod
    def torch_key_map(key: str) -> str | None:
        """The sin-cos `pos_embed.pos_embed` buffer is recomputed, never loaded."""
        return None if key == "pos_embed.pos_embed" else key

    def torch_persistent_buffers(self) -> dict[str, np.ndarray]:
        """diffusers keeps PatchEmbed's full (max, max) sin-cos table as a persistent buffer
        when pos_embed_max_size is set (SD3's files hold it); saving it spares diffusers'
        from_pretrained a "newly initialized" warning on our exports."""
        m = self.config.pos_embed_max_size
        if m is None:
            return {}
        # the uncropped table: PatchEmbed's positions for a full (max, max)-patch latent
        return {"pos_embed.pos_embed": self.pos_embed.positions(m, m, self.config.inner_dim)[None]}

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """hidden_states (B, H, W, C) latents; encoder_hidden_states (B, L, joint_attention_dim);
        pooled_projections (B, pooled_projection_dim); timestep (B,) or scalar, in the model's
        time units (SD3: t * 1000). Returns the velocity prediction (B, H, W, out_channels)."""
        cfg, p = self.config, self.config.patch_size
        b, h, w, c = hidden_states.shape
        if c != cfg.in_channels or h % p or w % p:
            raise ValueError(
                f"hidden_states shape {hidden_states.shape}: expected (B, H, W, {cfg.in_channels}) "
                f"with H and W divisible by patch_size={p}"
            )
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        x = constrain(self.pos_embed(hidden_states), (BATCH, LENGTH, None))  # (B, h*w, D)
        temb = self.time_text_embed(timestep, pooled_projections)  # (B, D)
        context = self.context_embedder(encoder_hidden_states)  # (B, L, D)
        for block in self.transformer_blocks:
            context, x = remat_call(block, x, context, temb, remat=cfg.remat)
        x = self.proj_out(self.norm_out(x, temb))  # (B, h*w, p*p*C)
        x = x.reshape(b, h // p, w // p, p, p, cfg.out_dim)  # (B, h, w, p, q, C)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, cfg.out_dim)  # (B, H, W, C)
