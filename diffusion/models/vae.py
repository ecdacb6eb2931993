"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "LDM", Sec. 3 and
App. G), diffusers `AutoencoderKL`, in channels-last Flax NNX.

`encode(x)` gives a diagonal Gaussian posterior over latents, `decode(z)` maps latents back to
images. Diffusion models work on `latents_from_images(x) = (z - shift_factor) * scaling_factor`
(SD 1.x/2.x: 4 channels, scale 0.18215; SDXL: 0.13025; SD3: 16 channels, scale 1.5305,
shift 0.0609). `decode_tiled` / `encode_tiled` process large inputs tile by tile and blend the
overlaps with linear ramps (no seams). The tiles are not exactly the untiled result: GroupNorm
statistics and the mid-block attention see one tile instead of the whole image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.models.layers import conv, group_norm
from diffusion.models.partitioning import remat_call
from diffusion.models.unet_blocks import BlockOptions, DownBlock, MidBlock, UpBlock

_IGNORED = ("sample_size", "force_upcast")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers AutoencoderKL config.json fields (+ our `remat`, `attn_implementation`)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None  # metadata only (kept for round trips)
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    remat: bool = False
    attn_implementation: str | None = None

    @classmethod
    def from_diffusers(cls, d: dict[str, Any], **overrides) -> VAEConfig:
        """Build from a diffusers AutoencoderKL config.json dict; unknown options raise."""
        name = d.get("_class_name", AutoencoderKL.diffusers_class)
        if name != AutoencoderKL.diffusers_class:
            raise ValueError(f"_class_name {name!r} is not {AutoencoderKL.diffusers_class!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw, bad = {}, []
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED:
                continue
            if key not in fields:
                bad.append(f"{key} (unknown option)")
            else:
                kw[key] = tuple(value) if isinstance(value, list) else value
        kw.update(overrides)
        for key, ok in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            bad += [f"{key}: {b!r} (supported: {ok!r})" for b in kw.get(key, ()) if b != ok]
        if bad:
            raise ValueError("unsupported AutoencoderKL config options: " + "; ".join(bad))
        return cls(**kw)

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["remat"], d["attn_implementation"]
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"_class_name": AutoencoderKL.diffusers_class, **d}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """diffusers `DiagonalGaussianDistribution` over NHWC latents (log-variance clipped to
    [-30, 20] as in LDM)."""

    def __init__(self, moments: jax.Array):
        self.mean, logvar = jnp.split(moments, 2, axis=-1)
        self.logvar = jnp.clip(logvar, -30.0, 20.0)
        self.std = jnp.exp(0.5 * self.logvar)
        self.var = jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over latent dimensions, (B,)."""
        return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _opts(cfg: VAEConfig) -> BlockOptions:
    return BlockOptions(
        temb_channels=None,
        groups=cfg.norm_num_groups,
        eps=1e-6,
        act=cfg.act_fn,
        attn_implementation=cfg.attn_implementation,
    )


def _mid_block(channels: int, cfg: VAEConfig, kw: dict) -> MidBlock:
    return MidBlock(
        channels,
        attention="self",
        opts=_opts(cfg),
        attn_groups=cfg.norm_num_groups,
        add_attention=cfg.mid_block_add_attention,
        **kw,
    )


class Encoder(nnx.Module):
    """diffusers `vae.Encoder`: conv_in, DownEncoderBlock2D stages, mid block, conv_out to
    2 * latent_channels (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype):
        kw, ch, opts = (
            dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype),
            cfg.block_out_channels,
            _opts(cfg),
        )
        self.remat = cfg.remat
        self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
        blocks = []
        for i in range(len(ch)):
            blocks.append(
                DownBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=cfg.layers_per_block,
                    attention=None,
                    opts=opts,
                    add_downsample=i < len(ch) - 1,
                    downsample_padding=0,  # LDM pads right/bottom only
                    **kw,
                )
            )
        self.down_blocks = nnx.List(blocks)
        self.mid_block = _mid_block(ch[-1], cfg, kw)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups, 1e-6, **kw)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = remat_call(block, x, remat=self.remat)[0]
        x = remat_call(self.mid_block, x, remat=self.remat)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers `vae.Decoder`: conv_in, mid block, UpDecoderBlock2D stages, conv_out."""

    def __init__(self, cfg: VAEConfig, *, rngs, dtype, param_dtype):
        kw, opts = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype), _opts(cfg)
        rch, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.remat = cfg.remat
        self.conv_in = conv(cfg.latent_channels, rch[0], 3, **kw)
        self.mid_block = _mid_block(rch[0], cfg, kw)
        blocks = []
        for i in range(n):
            c_in = rch[max(i - 1, 0)]
            blocks.append(
                UpBlock(
                    c_in,
                    c_in,
                    rch[i],
                    num_layers=cfg.layers_per_block + 1,
                    attention=None,
                    opts=opts,
                    add_upsample=i < n - 1,
                    skip=False,
                    **kw,
                )
            )
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(rch[-1], cfg.norm_num_groups, 1e-6, **kw)
        self.conv_out = conv(rch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = remat_call(self.mid_block, self.conv_in(z), remat=self.remat)
        for block in self.up_blocks:
            x = remat_call(block, x, remat=self.remat)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, n): every `stride`, the last one flush with the end."""
    if n <= tile:
        return [0]
    return sorted(set(range(0, n - tile, stride)) | {n - tile})


def _ramp(length: int, ramp: int, rise: bool, fall: bool) -> np.ndarray:
    """1-D blend weight of one tile: linear ramps of `ramp` samples on the sides that overlap
    a neighbour (rise: left/top, fall: right/bottom), 1 elsewhere; never exactly 0."""
    i = np.arange(length, dtype=np.float64) + 0.5
    w = np.ones(length)
    if rise:
        w = np.minimum(w, i / ramp)
    if fall:
        w = np.minimum(w, (length - i) / ramp)
    return w


def blend_tiles(fn, x: jax.Array, tile: int, overlap: int, num: int, den: int) -> jax.Array:
    """Apply `fn` to overlapping (tile x tile) windows of NHWC `x` and blend the results.

    fn maps a (B, tile, tile, C) window to (B, tile*num/den, tile*num/den, C'). Window
    outputs are averaged with weights that ramp linearly over the `overlap` band, so each
    output pixel is a convex combination of the windows that cover it (a partition of unity:
    a purely local `fn` is reproduced exactly).
    """
    h, w = x.shape[1:3]
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if (tile * num) % den or (overlap * num) % den:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {den}")
    ys, xs = _tile_starts(h, tile, tile - overlap), _tile_starts(w, tile, tile - overlap)
    to = lambda v: v * num // den  # input -> output coordinates
    ramp = max(to(overlap), 1)
    out = weight = 0.0
    for y0 in ys:
        wy = _ramp(to(min(tile, h)), ramp, y0 > 0, y0 < ys[-1])
        for x0 in xs:
            wx = _ramp(to(min(tile, w)), ramp, x0 > 0, x0 < xs[-1])
            piece = fn(x[:, y0 : y0 + tile, x0 : x0 + tile])  # (B, t_out, t_out, C')
            wt = jnp.asarray(np.outer(wy, wx), piece.dtype)[None, :, :, None]  # (1, th, tw, 1)
            pad = (
                (0, 0),
                (to(y0), to(h - y0) - piece.shape[1]),
                (to(x0), to(w - x0) - piece.shape[2]),
                (0, 0),
            )
            out = out + jnp.pad(piece * wt, pad)
            weight = weight + jnp.pad(jnp.broadcast_to(wt, (1, *piece.shape[1:3], 1)), pad)
    return out / weight


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL` (NHWC): encoder, optional quant_conv / post_quant_conv
    (1x1 convs; SD3 has neither), decoder."""

    diffusers_class = "AutoencoderKL"
    config_class = VAEConfig

    def __init__(
        self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config, lc = config, config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = conv(2 * lc, 2 * lc, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv(lc, lc, 1, **kw) if config.use_post_quant_conv else None

    def _moments(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"images must be NHWC with {self.config.in_channels} channels, got {x.shape}"
            )
        m = self.encoder(x)
        return m if self.quant_conv is None else self.quant_conv(m)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Images (B, H, W, C) in [-1, 1] -> posterior over (B, H/f, W/f, latent_channels)."""
        return DiagonalGaussian(self._moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, C)."""
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be NHWC with {self.config.latent_channels} channels, got {z.shape}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, *, sample_posterior: bool = False, rng: jax.Array | None = None
    ):
        """Reconstruction decode(z) with z the posterior mode (or a sample, given rng)."""
        posterior = self.encode(x)
        z = posterior.sample(rng) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ---- scaled latents used by diffusion models
    def latents_from_images(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """(z - shift_factor) * scaling_factor with z the posterior mode, or a sample given rng."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of latents_from_images: decode(latents / scaling_factor + shift_factor)."""
        return self.decode(latents / self.config.scaling_factor + (self.config.shift_factor or 0.0))

    # ---- tiled processing for inputs larger than what fits in memory at once
    def decode_tiled(self, z: jax.Array, tile_size: int = 64, overlap: int = 16) -> jax.Array:
        """decode() on (tile_size x tile_size) latent windows overlapping by `overlap` latent
        pixels, blended with linear ramps (tile_size, overlap in latent units)."""
        f = self.config.downsample_factor
        return blend_tiles(lambda t: _decode_jit(self, t), z, tile_size, overlap, f, 1)

    def encode_tiled(
        self, x: jax.Array, tile_size: int = 512, overlap: int = 128
    ) -> DiagonalGaussian:
        """encode() on overlapping image windows (tile_size, overlap in pixels, multiples of
        the downsampling factor); blends the posterior moments (mean, log-variance)."""
        f = self.config.downsample_factor
        moments = blend_tiles(lambda t: _moments_jit(self, t), x, tile_size, overlap, 1, f)
        return DiagonalGaussian(moments)


# One compiled program per tile shape, reused by every tile (and cached across calls).
_decode_jit = nnx.jit(lambda vae, z: vae.decode(z))
_moments_jit = nnx.jit(lambda vae, x: vae._moments(x))
