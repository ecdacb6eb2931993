"""AutoencoderKL parity against diffusers (PyTorch, CPU, fp32), latent scaling, gradients,
remat, and tiled encode/decode."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from diffusion.models import load_diffusers
from diffusion.models.vae import AutoencoderKL, VAEConfig, blend_tiles

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
)
CONFIGS = {
    "sd_4ch": dict(TINY, latent_channels=4),  # scaling_factor 0.18215, quant convs
    "sd3_16ch": dict(
        TINY,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(a):
    return torch.tensor(np.asarray(a).transpose(0, 3, 1, 2))


_PAIRS = {}


def _build_pair(name, tmp_path_factory):
    """(torch AutoencoderKL, ours) with identical weights via a diffusers folder (cached)."""
    if name in _PAIRS:
        return _PAIRS[name]
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**CONFIGS[name]).eval()
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if "norm" in key:  # norms are initialised to identity; make them matter
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder)
    ours = load_diffusers(str(folder))  # config.json -> VAEConfig.from_diffusers + safetensors
    assert isinstance(ours, AutoencoderKL)
    assert ours.config == VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    _PAIRS[name] = ref, ours
    return ref, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return _build_pair(request.param, tmp_path_factory)


def test_parity_encode_decode_forward(pair):
    ref, ours = pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(_nchw(x)).latent_dist
        z = post.mode()
        dec = ref.decode(z).sample
        full = ref(_nchw(x), sample_posterior=False).sample
        kl = post.kl()
    ours_post = ours.encode(jnp.asarray(x))
    errors = {
        "mean": _rel(ours_post.mean, _nhwc(post.mean)),
        "std": _rel(ours_post.std, _nhwc(post.std)),
        "kl": _rel(ours_post.kl(), kl.numpy()),
        "decode": _rel(ours.decode(jnp.asarray(_nhwc(z))), _nhwc(dec)),
        "forward": _rel(ours(jnp.asarray(x)), _nhwc(full)),
    }
    print(ours.config.latent_channels, "channels, max relative errors:", errors)
    assert max(errors.values()) <= 1e-4
    assert VAEConfig.from_diffusers(ours.config.to_diffusers()) == ours.config
    rebuilt = TorchAutoencoderKL.from_config(ours.config.to_diffusers())
    assert rebuilt.state_dict().keys() == ref.state_dict().keys()


def test_scaled_latents(pair):
    """latents_from_images = (mode - shift) * scale; images_from_latents inverts it."""
    ref, ours = pair
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        want = (ref.encode(_nchw(x)).latent_dist.mode() - shift) * scale
        want_img = ref.decode(want / scale + shift).sample
    lat = ours.latents_from_images(jnp.asarray(x))
    assert _rel(lat, _nhwc(want)) <= 1e-4
    assert _rel(ours.images_from_latents(lat), _nhwc(want_img)) <= 1e-4
    # sampling: z = mean + std * eps, reproducible from the key
    post = ours.encode(jnp.asarray(x))
    key = jax.random.key(0)
    eps = (post.sample(key) - post.mean) / post.std
    np.testing.assert_allclose(eps, jax.random.normal(key, post.mean.shape), atol=1e-4)


def _loss_and_grads(model, dtype, remat=False):
    """Reconstruction + KL loss of a posterior sample and its parameter gradients."""
    m = AutoencoderKL(dataclasses.replace(model.config, remat=remat), rngs=nnx.Rngs(0), dtype=dtype)
    nnx.update(m, nnx.state(model, nnx.Param))
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)

    def loss(m):
        post = m.encode(x)
        rec = m.decode(post.sample(jax.random.key(0)))
        return jnp.mean((rec.astype(jnp.float32) - x) ** 2) + 1e-6 * jnp.mean(post.kl())

    return nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(m)


def test_gradients_finite_bf16_fp32_and_remat(tmp_path_factory):
    """On the 16-channel config only, to save compile time (quant convs are 1x1 convs)."""
    _, ours = _build_pair("sd3_16ch", tmp_path_factory)
    results = {
        "fp32": _loss_and_grads(ours, jnp.float32),
        "bf16": _loss_and_grads(ours, jnp.bfloat16),
        "fp32_remat": _loss_and_grads(ours, jnp.float32, remat=True),
    }
    for loss, grads in results.values():
        leaves = jax.tree.leaves(grads)
        assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    (loss, grads), (loss_r, grads_r) = results["fp32"], results["fp32_remat"]
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_blend_tiles_reproduces_a_local_map():
    """With a local, translation-equivariant map (3x3 conv then 2x nearest upsampling) the
    tiles agree with the untiled result exactly away from tile borders; in the blend bands
    only the padded tile edges differ, and the ramps keep that difference small."""
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 3)) / 6.0

    def fn(z):  # (B, h, w, 4) -> (B, 2h, 2w, 3), receptive field one latent pixel
        y = jax.lax.conv_general_dilated(
            z, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)

    z = jax.random.normal(jax.random.key(1), (1, 40, 36, 4))
    full, tiled = fn(z), blend_tiles(fn, z, 16, 6, 2, 1)
    diff = np.abs(np.asarray(tiled - full)).max(axis=(0, 3))  # (H, W)
    # Tile origins: H 0, 10, 20, 24; W 0, 10, 20 (tile 16). A tile's output is inexact only on
    # its first/last latent row/column where that edge lies inside the image (zero padding).
    bad_rows, bad_cols = {10, 20, 24, 15, 25, 35}, {10, 20, 15, 25}
    rows = np.array([r // 2 not in bad_rows for r in range(diff.shape[0])])
    cols = np.array([c // 2 not in bad_cols for c in range(diff.shape[1])])
    interior = rows[:, None] & cols[None, :]
    print(
        f"local map: max diff {diff.max():.3f} in blend bands, {diff[interior].max():.2e} elsewhere"
    )
    assert diff[interior].max() < 1e-5


def test_tiled_decode_and_encode(pair):
    """The real decoder is not local (GroupNorm statistics and mid-block attention see one
    tile), so tiles differ everywhere by a modest amount; we report it and bound it."""
    _, ours = pair
    lc = ours.config.latent_channels
    z = jax.random.normal(jax.random.key(3), (1, 24, 24, lc))
    full, tiled = np.asarray(ours.decode(z)), np.asarray(ours.decode_tiled(z, 16, 8))
    assert tiled.shape == full.shape == (1, 48, 48, 3)
    d = np.abs(tiled - full).max(axis=(0, 3))
    band = np.zeros_like(d, bool)
    band[16:32, :] = band[:, 16:32] = True  # latent overlap [8, 16) x 2 pixels
    print(
        f"VAE decode_tiled(tile 16, overlap 8) vs decode, {lc} ch: max|diff| blend region "
        f"{d[band].max():.3f}, elsewhere {d[~band].max():.3f}, max|decode| {np.abs(full).max():.3f}"
    )
    assert d.max() < 0.5 * np.abs(full).max()
    x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, 48, 48, 3)), jnp.float32)
    post, post_t = ours.encode(x), ours.encode_tiled(x, 32, 16)
    assert post_t.mean.shape == post.mean.shape == (1, 24, 24, lc)
    assert _rel(post_t.mean, post.mean) < 0.5


def test_bad_config_names_the_option():
    base = {"_class_name": "AutoencoderKL", **CONFIGS["sd_4ch"]}
    with pytest.raises(ValueError, match="frobnicate"):
        VAEConfig.from_diffusers({**base, "frobnicate": 1})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_diffusers({**base, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="latents must be NHWC with 4 channels"):
        AutoencoderKL(VAEConfig.from_diffusers(base), rngs=nnx.Rngs(0)).decode(
            jnp.zeros((1, 4, 4, 3))
        )
    with pytest.raises(ValueError, match="overlap"):
        blend_tiles(lambda z: z, jnp.zeros((1, 8, 8, 1)), 4, 4, 1, 1)
