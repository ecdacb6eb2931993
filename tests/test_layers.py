"""Layer parity against the diffusers PyTorch modules (CPU, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward as TorchFeedForward
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.embeddings import TimestepEmbedding as TorchTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.normalization import RMSNorm as TorchRMSNorm
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from flax import nnx

from diffusion.models import layers, resnet
from diffusion.models.convert import load_torch_state_dict
from diffusion.models.unet_blocks import BlockOptions, Transformer2DModel

RNGS = nnx.Rngs(0)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _load(ours, ref):
    """Copy weights from a random torch module whose norm weights were perturbed."""
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if "norm" in key:
                p.add_(0.1 * torch.randn_like(p))
    load_torch_state_dict(ours, ref.state_dict())
    return ours


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(a):
    return torch.tensor(np.asarray(a).transpose(0, 3, 1, 2))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "flip,shift,scale,dim", [(False, 1.0, 1.0, 32), (True, 0.0, 1.0, 32), (True, 1.0, 2.5, 33)]
)
def test_timestep_embedding(flip, shift, scale, dim):
    t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
    want = get_timestep_embedding(torch.tensor(t), dim, flip, shift, scale).numpy()
    got = layers.timestep_embedding(
        t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale
    )
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-4  # fp32 sin/cos of arguments up to ~2500


def test_timestep_mlp():
    torch.manual_seed(0)
    ref = TorchTimestepEmbedding(16, 32)
    ours = _load(layers.TimestepEmbedding(16, 32, rngs=RNGS), ref)
    x = _randn(3, 16)
    assert _rel(ours(x), ref(torch.tensor(x)).detach().numpy()) <= 1e-5


@pytest.mark.parametrize("act", ["gelu", "gelu-approximate", "geglu"])
def test_feedforward(act):
    torch.manual_seed(0)
    ref = TorchFeedForward(16, activation_fn=act)
    ours = _load(layers.FeedForward(16, activation_fn=act, rngs=RNGS), ref)
    x = _randn(2, 5, 16)
    assert _rel(ours(x), ref(torch.tensor(x)).detach().numpy()) <= 1e-5


def test_rmsnorm():
    torch.manual_seed(0)
    ref = TorchRMSNorm(16, eps=1e-6)
    ours = _load(layers.RMSNorm(16, 1e-6, rngs=RNGS), ref)
    with torch.no_grad():
        ref.weight.add_(0.3 * torch.randn(16))
    load_torch_state_dict(ours, ref.state_dict())
    x = 3.0 * _randn(2, 5, 16)
    assert _rel(ours(x), ref(torch.tensor(x)).detach().numpy()) <= 1e-5


def test_dot_product_attention_matches_softmax_formula():
    q, k, v = _randn(2, 5, 3, 8, seed=1), _randn(2, 7, 3, 8, seed=2), _randn(2, 7, 3, 8, seed=3)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)  # (B, H, Lq, Lk)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)  # (B, Lq, H, Dh)
    assert _rel(layers.dot_product_attention(q, k, v, implementation="xla"), want) <= 1e-5
    with pytest.raises(ValueError, match="cudnn"):
        layers.dot_product_attention(q, k, v, implementation="flash")


def test_attention_self_and_cross():
    torch.manual_seed(0)
    x, ctx = _randn(2, 6, 16), _randn(2, 4, 12, seed=1)
    for cross in (None, 12):
        ref = TorchAttention(16, cross_attention_dim=cross, heads=2, dim_head=8, bias=cross is None)
        ours = _load(
            layers.Attention(16, cross, heads=2, dim_head=8, bias=cross is None, rngs=RNGS), ref
        )
        c = None if cross is None else ctx
        want = ref(torch.tensor(x), None if c is None else torch.tensor(c)).detach().numpy()
        assert _rel(ours(x, c), want) <= 1e-5


def test_attention_group_norm_residual_nhwc():
    """The UNet2DModel / VAE attention block: GroupNorm, residual, rescale, on NHWC maps."""
    torch.manual_seed(0)
    kw = dict(heads=2, dim_head=8, bias=True, norm_num_groups=4, residual_connection=True)
    ref = TorchAttention(16, rescale_output_factor=2.0, eps=1e-6, **kw)
    ours = _load(layers.Attention(16, rescale_output_factor=2.0, eps=1e-6, **kw, rngs=RNGS), ref)
    x = _randn(2, 4, 5, 16)
    assert _rel(ours(x), _nhwc(ref(_nchw(x)))) <= 1e-5


@pytest.mark.parametrize(
    "c_in,c_out,norm", [(16, 16, "default"), (16, 32, "default"), (16, 32, "scale_shift")]
)
def test_resnet_block(c_in, c_out, norm):
    torch.manual_seed(0)
    kw = dict(temb_channels=24, groups=4, eps=1e-6, time_embedding_norm=norm)
    ref = TorchResnetBlock2D(in_channels=c_in, out_channels=c_out, **kw)
    ours = _load(resnet.ResnetBlock2D(c_in, c_out, **kw, rngs=RNGS), ref)
    assert (ours.conv_shortcut is None) == (c_in == c_out)
    x, temb = _randn(2, 6, 6, c_in), _randn(2, 24, seed=1)
    assert _rel(ours(x, temb), _nhwc(ref(_nchw(x), torch.tensor(temb)))) <= 1e-5


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
    torch.manual_seed(0)
    ref = TorchDownsample2D(8, use_conv=True, out_channels=16, padding=padding, name="op")
    ours = _load(resnet.Downsample2D(8, out_channels=16, padding=padding, rngs=RNGS), ref)
    x = _randn(2, 7, 8, 8)
    assert _rel(ours(x), _nhwc(ref(_nchw(x)))) <= 1e-5
    pool = resnet.Downsample2D(8, use_conv=False, rngs=RNGS)
    want = _nhwc(TorchDownsample2D(8, use_conv=False)(_nchw(x[:, :6])))
    assert _rel(pool(x[:, :6]), want) <= 1e-6


def test_upsample_with_and_without_size():
    torch.manual_seed(0)
    ref = TorchUpsample2D(8, use_conv=True, out_channels=8)
    ours = _load(resnet.Upsample2D(8, out_channels=8, rngs=RNGS), ref)
    x = _randn(2, 4, 5, 8)
    assert _rel(ours(x), _nhwc(ref(_nchw(x)))) <= 1e-5
    assert _rel(ours(x, (7, 9)), _nhwc(ref(_nchw(x), output_size=(7, 9)))) <= 1e-5


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer(linear):
    torch.manual_seed(0)
    ref = TorchTransformer2D(
        2, 16, in_channels=32, num_layers=2, cross_attention_dim=12, norm_num_groups=8,
        use_linear_projection=linear,
    )  # fmt: skip
    opts = BlockOptions(groups=8, cross_attention_dim=12, use_linear_projection=linear)
    ours = Transformer2DModel(32, 2, 2, opts, rngs=RNGS, dtype=jnp.float32, param_dtype=jnp.float32)
    _load(ours, ref)
    x, ctx = _randn(2, 4, 3, 32), _randn(2, 5, 12, seed=1)
    want = _nhwc(ref(_nchw(x), encoder_hidden_states=torch.tensor(ctx)).sample)
    assert _rel(ours(x, ctx), want) <= 1e-5


def test_bf16_compute_with_fp32_params():
    block = resnet.ResnetBlock2D(16, 32, temb_channels=8, groups=4, rngs=RNGS, dtype=jnp.bfloat16)
    y = block(jnp.ones((1, 4, 4, 16)), jnp.ones((1, 8)))
    assert y.dtype == jnp.bfloat16 and block.conv1.kernel.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    with pytest.raises(ValueError, match="scale_shift"):
        resnet.ResnetBlock2D(4, time_embedding_norm="ada_group", groups=2, rngs=RNGS)
