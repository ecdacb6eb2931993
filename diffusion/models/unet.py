"""Configurable U-Net (Ronneberger et al. 2015; DDPM, Ho et al. 2020; LDM/Stable Diffusion,
Rombach et al. 2022; SDXL, Podell et al. 2023) in channels-last Flax NNX.

One class `UNet` serves both diffusers `UNet2DModel` (pixel-space DDPM, optional class labels)
and `UNet2DConditionModel` (latent SD 1.x/2.x/XL with cross-attention to text). Parameter names
mirror diffusers so that `convert.load_torch_state_dict` loads diffusers checkpoints directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion.models.layers import TimestepEmbedding, conv, group_norm, timestep_embedding
from diffusion.models.partitioning import remat_call
from diffusion.models.unet_blocks import (
    DOWN_BLOCKS,
    MID_BLOCKS,
    UP_BLOCKS,
    BlockOptions,
    DownBlock,
    MidBlock,
    UpBlock,
)

# Keys we accept only at the value that needs no extra code (anything else raises, naming it).
_FIXED = {
    "time_embedding_type": "positional",
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "time_embedding_act_fn": None,
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_only_cross_attention": None,
}
# Keys without effect on our forward pass (metadata; dropout is an inference no-op here).
_IGNORED = ("sample_size", "num_train_timesteps", "addition_embed_type_num_heads", "dropout")
_UNET2D_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    cross_attention_dim=None,
)
_UNET2D_KEYS = (
    "in_channels out_channels center_input_sample flip_sin_to_cos freq_shift down_block_types "
    "mid_block_type up_block_types block_out_channels layers_per_block downsample_padding "
    "mid_block_scale_factor act_fn attention_head_dim norm_num_groups attn_norm_num_groups "
    "norm_eps resnet_time_scale_shift add_attention class_embed_type num_class_embeds "
    "time_embedding_dim"
).split()


def _tupled(v):
    return tuple(_tupled(x) for x in v) if isinstance(v, list | tuple) else v


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of `UNet` with diffusers config.json field names (UNet2DConditionModel
    defaults). `remat` and `attn_implementation` are ours (not in diffusers configs)."""

    class_name: str = "UNet2DConditionModel"
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] | None = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple[int, ...] | None = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False  # fp32 attention logits: a no-op at fp32 compute
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    remat: bool = False
    attn_implementation: str | None = None

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], **overrides) -> UNetConfig:
        """Build from a diffusers UNet2DModel / UNet2DConditionModel config.json dict."""
        name = d.get("_class_name", "UNet2DConditionModel")
        if name not in UNet.diffusers_classes:
            raise ValueError(f"_class_name {name!r} is not one of {UNet.diffusers_classes}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"class_name"}
        kw: dict[str, Any] = dict(_UNET2D_DEFAULTS) if name == "UNet2DModel" else {}
        bad = []
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key in _FIXED:
                if _tupled(value) != _FIXED[key]:
                    bad.append(f"{key}={value!r} (only {_FIXED[key]!r} is supported)")
            elif key in fields:
                kw[key] = _tupled(value)
            else:
                bad.append(f"{key} (unknown option)")
        kw.update(overrides)
        for key in ("down_block_types", "up_block_types"):
            valid = DOWN_BLOCKS if key.startswith("down") else UP_BLOCKS
            bad += [
                f"{key}: {b!r} (supported: {sorted(valid)})"
                for b in kw.get(key, ())
                if b not in valid
            ]
        mid = kw.get("mid_block_type", cls.mid_block_type)
        if mid is not None and mid not in MID_BLOCKS:
            bad.append(f"mid_block_type={mid!r} (supported: {sorted(MID_BLOCKS)} or None)")
        for key, ok in (
            ("class_embed_type", (None, "timestep", "projection")),
            ("addition_embed_type", (None, "text_time")),
            ("resnet_time_scale_shift", ("default", "scale_shift")),
        ):
            if kw.get(key, getattr(cls, key)) not in ok:
                bad.append(f"{key}={kw[key]!r} (supported: {ok})")
        if bad:
            raise ValueError(f"unsupported {name} config options: " + "; ".join(bad))
        return cls(class_name=name, **kw)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config.json dict (lists instead of tuples)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("remat", "class_name")}
        d.pop("attn_implementation")
        if self.class_name == "UNet2DModel":
            d = {k: d[k] for k in _UNET2D_KEYS}
        else:  # drop UNet2DModel-only keys, add the fixed UNet2DConditionModel options
            d = {k: v for k, v in d.items() if k not in ("attn_norm_num_groups", "add_attention")}
            d.update(
                {k: v for k, v in _FIXED.items() if k not in ("downsample_type", "upsample_type")}
            )
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"_class_name": self.class_name, **d}

    # ---- derived per-block settings (diffusers UNet2DConditionModel.__init__ semantics)
    def per_block(self, value) -> tuple:
        n = len(self.down_block_types)
        return tuple(value) if isinstance(value, tuple) else (value,) * n

    @property
    def is_conditional(self) -> bool:
        return self.class_name == "UNet2DConditionModel"

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def heads(self) -> tuple:
        """Cross-attention heads per block: diffusers reads `attention_head_dim` as the head
        *count* when `num_attention_heads` is unset (a historical naming quirk of SD configs)."""
        return self.per_block(self.num_attention_heads or self.attention_head_dim)


def _opts(cfg: UNetConfig, temb: int, i: int, *, up: bool = False) -> BlockOptions:
    """Options of down block i (or up block i when up=True; diffusers reverses the per-block
    lists for up blocks, except attention_head_dim, which it does not)."""
    rev = (lambda t: t[::-1]) if up else (lambda t: t)
    head_dim = cfg.per_block(cfg.attention_head_dim)[i]
    return BlockOptions(
        temb_channels=temb,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        act=cfg.act_fn,
        time_embedding_norm=cfg.resnet_time_scale_shift,
        attention_head_dim=head_dim or rev(cfg.block_out_channels)[i],
        cross_attention_dim=rev(cfg.per_block(cfg.cross_attention_dim))[i],
        use_linear_projection=cfg.use_linear_projection,
        only_cross_attention=rev(cfg.per_block(cfg.only_cross_attention))[i],
        attn_implementation=cfg.attn_implementation,
    )


class UNet(nnx.Module):
    """diffusers UNet2DModel / UNet2DConditionModel (NHWC).

    __call__(sample (B, H, W, C), timestep (B,) or scalar, encoder_hidden_states (B, L, D)
    or None, *, class_labels, added_cond_kwargs={'text_embeds', 'time_ids'} (SDXL),
    return_skips) -> output (B, H, W, out_channels); with return_skips=True also the tuple of
    down-block skip features and the mid-block output (what a ControlNet adds residuals to).
    """

    diffusers_classes = ("UNet2DModel", "UNet2DConditionModel")
    diffusers_class = "UNet2DConditionModel"
    config_class = UNetConfig

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):  # fmt: skip
        cfg, kw = config, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype = cfg, dtype
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        if not (len(cfg.down_block_types) == len(cfg.up_block_types) == n):
            raise ValueError(
                f"down_block_types {cfg.down_block_types}, up_block_types {cfg.up_block_types} "
                f"and block_out_channels {ch} must have the same length"
            )
        temb = cfg.time_embed_dim
        act = cfg.act_fn if cfg.is_conditional else "silu"
        self.conv_in = conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb, act_fn=act, **kw)
        self.class_embedding = nnx.data(None)
        if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
            self.class_embedding = nnx.Embed(cfg.num_class_embeds, temb, **kw)
        elif cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(ch[0], temb, act_fn=act, **kw)
        elif cfg.class_embed_type == "projection":
            d_in = cfg.projection_class_embeddings_input_dim
            self.class_embedding = TimestepEmbedding(d_in, temb, act_fn=act, **kw)
        self.add_embedding = nnx.data(None)
        if cfg.addition_embed_type == "text_time":
            d_in = cfg.projection_class_embeddings_input_dim
            self.add_embedding = TimestepEmbedding(d_in, temb, act_fn=act, **kw)
        self._build_blocks(cfg, temb, kw)
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

    def _build_blocks(self, cfg: UNetConfig, temb: int, kw: dict) -> None:
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        layers, tlayers = (
            cfg.per_block(cfg.layers_per_block),
            cfg.per_block(cfg.transformer_layers_per_block),
        )
        heads = cfg.heads()
        down = []
        for i, name in enumerate(cfg.down_block_types):
            down.append(DownBlock(
                ch[max(i - 1, 0)], ch[i], num_layers=layers[i], attention=DOWN_BLOCKS[name],
                opts=_opts(cfg, temb, i), add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, heads=heads[i],
                transformer_layers=tlayers[i], **kw,
            ))  # fmt: skip
        self.down_blocks = nnx.List(down)
        self.mid_block = nnx.data(None)
        if cfg.mid_block_type is not None:
            attn_groups = cfg.attn_norm_num_groups or (
                cfg.norm_num_groups if cfg.resnet_time_scale_shift == "default" else None
            )
            self.mid_block = MidBlock(
                ch[-1], attention=MID_BLOCKS[cfg.mid_block_type], opts=_opts(cfg, temb, n - 1),
                heads=heads[-1], transformer_layers=tlayers[-1],
                output_scale_factor=cfg.mid_block_scale_factor, attn_groups=attn_groups,
                add_attention=cfg.add_attention, **kw,
            )  # fmt: skip
        rch, rheads, rlayers, rtl = ch[::-1], heads[::-1], layers[::-1], tlayers[::-1]
        up = []
        for i, name in enumerate(cfg.up_block_types):
            up.append(UpBlock(
                rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], num_layers=rlayers[i] + 1,
                attention=UP_BLOCKS[name], opts=_opts(cfg, temb, i, up=True),
                add_upsample=i < n - 1, heads=rheads[i], transformer_layers=rtl[i], **kw,
            ))  # fmt: skip
        self.up_blocks = nnx.List(up)

    def _embed(self, timesteps, batch, class_labels, added_cond_kwargs) -> jax.Array:
        """Time (+ class / SDXL micro-conditioning) embedding, (B, time_embed_dim)."""
        cfg, ch0 = self.config, self.config.block_out_channels[0]
        sincos = dict(flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32)), (batch,))
        emb = self.time_embedding(timestep_embedding(t, ch0, **sincos).astype(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this UNet is class-conditional")
            if cfg.class_embed_type == "timestep":
                class_labels = timestep_embedding(class_labels, ch0, **sincos).astype(self.dtype)
            emb = emb + self.class_embedding(class_labels).astype(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given but the UNet has no class embedding")
        if self.add_embedding is not None:
            if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
                raise ValueError(
                    "addition_embed_type='text_time' needs added_cond_kwargs with "
                    "'text_embeds' (B, D) and 'time_ids' (B, K)"
                )
            text, ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            tid = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, **sincos)
            tid = tid.reshape(text.shape[0], -1)  # (B, K * addition_time_embed_dim)
            emb = emb + self.add_embedding(jnp.concatenate([text, tid], -1).astype(self.dtype))
        return emb

    def __call__(
        self, sample, timestep, encoder_hidden_states=None, *, class_labels=None,
        added_cond_kwargs=None, down_block_additional_residuals=None,
        mid_block_additional_residual=None, return_skips=False,
    ):  # fmt: skip
        cfg, remat = self.config, self.config.remat
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"sample must be NHWC with {cfg.in_channels} channels, got shape {sample.shape}"
            )
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embed(timestep, sample.shape[0], class_labels, added_cond_kwargs)
        ctx = encoder_hidden_states
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, res = remat_call(block, x, emb, ctx, remat=remat)
            skips.extend(res)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if self.mid_block is not None:
            x = remat_call(self.mid_block, x, emb, ctx, remat=remat)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        down_skips, mid = tuple(skips), x
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(s % factor for s in sample.shape[1:3])  # diffusers forward_upsample_size
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[1:3] if (odd and i < len(self.up_blocks) - 1) else None
            x = remat_call(block, x, tuple(res), emb, ctx, remat=remat, upsample_size=size)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return (x, down_skips, mid) if return_skips else x
