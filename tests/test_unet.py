"""UNet parity against diffusers UNet2DModel / UNet2DConditionModel (PyTorch, CPU, fp32).

Each tiny reference model is random-initialised (norm weights perturbed so they matter),
saved with save_pretrained, and read back through config.json + safetensors into our UNet.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from flax import nnx

from diffusion.models import load_diffusers
from diffusion.models.unet import UNet, UNetConfig

TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
CONFIGS = {
    "ddpm_class_cond": (
        UNet2DModel,
        dict(
            TINY,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            num_class_embeds=10,
        ),
    ),
    "sd1": (
        UNet2DConditionModel,
        dict(
            TINY,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=2,
        ),
    ),
    "sd2": (
        UNet2DConditionModel,
        dict(
            TINY,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        ),
    ),
    "sdxl": (
        UNet2DConditionModel,
        dict(
            TINY,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=24,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
        ),
    ),
}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def build_pair(name, tmp_path):
    """(torch model, our UNet) with identical weights, via a diffusers folder on disk."""
    cls, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    ref = cls(**kwargs).eval()
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if "norm" in key:  # norms are initialised to identity; make them matter
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / name
    ref.save_pretrained(folder)
    ours = load_diffusers(str(folder))  # config.json -> UNetConfig.from_diffusers + safetensors
    assert isinstance(ours, UNet)
    assert ours.config == UNetConfig.from_diffusers(
        json.loads((folder / "config.json").read_text())
    )
    return ref, ours


def inputs(name, size=16, seed=0):
    rng = np.random.default_rng(seed)
    c = 3 if name == "ddpm_class_cond" else 4
    x = rng.standard_normal((2, c, size, size)).astype(np.float32)
    t = np.array([3.0, 750.0], np.float32)
    kw = {}
    if name == "ddpm_class_cond":
        kw["class_labels"] = np.array([1, 7])
    else:
        kw["encoder_hidden_states"] = rng.standard_normal((2, 5, 24)).astype(np.float32)
    if name == "sdxl":
        kw["added_cond_kwargs"] = dict(
            text_embeds=rng.standard_normal((2, 16)).astype(np.float32),
            time_ids=np.tile(np.array([32, 32, 0, 0, 32, 32], np.float32), (2, 1)),
        )
    return x, t, kw


def run_torch(ref, x, t, kw, **extra):
    tkw = {
        k: ({a: torch.tensor(b) for a, b in v.items()} if isinstance(v, dict) else torch.tensor(v))
        for k, v in kw.items()
    }
    with torch.no_grad():
        return _nhwc(ref(torch.tensor(x), torch.tensor(t), **tkw, **extra).sample)


def run_ours(model, x, t, kw, **extra):
    kw = dict(kw)
    ctx = kw.pop("encoder_hidden_states", None)
    return model(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), ctx, **kw, **extra)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, tmp_path):
    ref, ours = build_pair(name, tmp_path)
    x, t, kw = inputs(name)
    err = _rel(run_ours(ours, x, t, kw), run_torch(ref, x, t, kw))
    print(f"{name}: max relative error {err:.2e}")
    assert err <= 1e-4
    # The config round-trips and diffusers builds the same parameter set from to_diffusers().
    assert UNetConfig.from_diffusers(ours.config.to_diffusers()) == ours.config
    rebuilt = type(ref).from_config(ours.config.to_diffusers())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_odd_size_skips_and_controlnet_residuals(tmp_path):
    """15x15 input (diffusers forwards upsample sizes) with ControlNet-style residuals added
    to every skip and to the mid block; return_skips exposes what they are added to."""
    ref, ours = build_pair("sd1", tmp_path)
    x, t, kw = inputs("sd1", size=15)
    out, skips, mid = run_ours(ours, x, t, kw, return_skips=True)
    rng = np.random.default_rng(1)
    res = [0.1 * rng.standard_normal(s.shape).astype(np.float32) for s in skips]
    mid_res = 0.1 * rng.standard_normal(mid.shape).astype(np.float32)
    got = run_ours(
        ours, x, t, kw,
        down_block_additional_residuals=[jnp.asarray(r) for r in res],
        mid_block_additional_residual=jnp.asarray(mid_res),
    )  # fmt: skip
    want = run_torch(
        ref, x, t, kw,
        down_block_additional_residuals=[torch.tensor(r.transpose(0, 3, 1, 2)) for r in res],
        mid_block_additional_residual=torch.tensor(mid_res.transpose(0, 3, 1, 2)),
    )  # fmt: skip
    assert out.shape == (2, 15, 15, 4) and len(skips) == 4  # conv_in, resnet, down, resnet
    assert _rel(got, want) <= 1e-4


@pytest.fixture(scope="module")
def sd1_model(tmp_path_factory):
    return build_pair("sd1", tmp_path_factory.mktemp("sd1"))[1]


def _loss_and_grads(model, dtype, remat=False):
    """Mean-square output and parameter gradients, with compute in `dtype`."""
    m = UNet(dataclasses.replace(model.config, remat=remat), rngs=nnx.Rngs(0), dtype=dtype)
    nnx.update(m, nnx.state(model, nnx.Param))
    x, t, kw = inputs("sd1", size=8)

    def loss(m):
        return jnp.mean(run_ours(m, x, t, kw).astype(jnp.float32) ** 2)

    return nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(m)


@pytest.fixture(scope="module")
def fp32_grads(sd1_model):
    return _loss_and_grads(sd1_model, jnp.float32)


def _check_finite(loss, grads):
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_gradients_finite_fp32_and_bf16(sd1_model, fp32_grads):
    _check_finite(*fp32_grads)
    loss16, grads16 = _loss_and_grads(sd1_model, jnp.bfloat16)  # fp32 params, bf16 compute
    _check_finite(loss16, grads16)
    assert abs(float(loss16) / float(fp32_grads[0]) - 1) < 0.05


def test_remat_matches(sd1_model, fp32_grads):
    loss0, g0 = fp32_grads
    loss1, g1 = _loss_and_grads(sd1_model, jnp.float32, remat=True)
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_bad_config_names_the_option():
    base = {"_class_name": "UNet2DConditionModel", **CONFIGS["sd1"][1]}
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_diffusers({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 2})
    with pytest.raises(ValueError, match="addition_embed_type='image'"):
        UNetConfig.from_diffusers({**base, "addition_embed_type": "image"})
    with pytest.raises(ValueError, match="encoder_hid_dim_type"):
        UNetConfig.from_diffusers({**base, "encoder_hid_dim_type": "text_proj"})
    with pytest.raises(ValueError, match="frobnicate"):
        UNetConfig.from_diffusers({**base, "frobnicate": 3})
    with pytest.raises(ValueError, match="4 channels"):
        UNet(UNetConfig.from_diffusers(base), rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 3)), 1.0)
