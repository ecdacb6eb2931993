"""SD3Transformer (MMDiT) vs diffusers SD3Transformer2DModel on CPU, plus grads / remat / sharding."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx
from safetensors.numpy import load_file

from diffusion import sharding
from diffusion.models.convert import load_torch_state_dict
from diffusion.models.mmdit import MMDiTConfig, SD3Transformer

BASE = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=16,
)
# name: (diffusers kwargs, latent (H, W) sizes run through the same model)
CASES = {
    # plain SD3 (no qk norm); square and non-square latents cropped from a 10x10 position grid
    "sd3_crop": (dict(BASE, pos_embed_max_size=10), [(16, 16), (12, 8)]),
    # SD3.5: rms qk-norm everywhere, MMDiT-X dual attention in the first block only
    "sd35_rms_dual": (
        dict(BASE, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0,)),
        [(16, 16)],
    ),
    # no pos_embed_max_size: positions recomputed for a non-square grid
    "no_max_size": (dict(BASE, pos_embed_max_size=None), [(8, 12)]),
}
# Gradients / remat / sharding: last block is both context_pre_only and dual-attention.
GRAD_KW = dict(BASE, qk_norm="rms_norm", dual_attention_layers=(1,))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (incl. zero-initialised / unit norm weights) with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.2 * r)
            else:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))


def _inputs(kw, hw, batch=2, seq=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *hw, kw["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((batch, seq, kw["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((batch, kw["pooled_projection_dim"])).astype(np.float32)
    t = np.array([981.5, 37.25][:batch], np.float32)
    return x, ctx, pooled, t


def _torch_reference(kw, tmp_path, seed=0):
    """Random-init diffusers model saved in diffusers format: (config dict, state dict, model)."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**kw).eval()
    _randomize(ref, seed)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    return config, load_file(str(tmp_path / "diffusion_pytorch_model.safetensors")), ref


def _ours(config, state_dict, **kw):
    model = SD3Transformer(MMDiTConfig.from_diffusers(config, **kw), rngs=nnx.Rngs(0))
    load_torch_state_dict(model, state_dict)
    return model


def _jit_apply(model):
    graphdef, state = nnx.split(model)
    fn = _jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    return lambda *a: fn(state, *a)


# Tiny models: XLA's backend optimizations cost far more compile time than they save at run time.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_diffusers(case, tmp_path):
    kw, sizes = CASES[case]
    config, sd, ref = _torch_reference(kw, tmp_path)
    apply = _jit_apply(_ours(config, sd))
    for hw in sizes:
        x, ctx, pooled, t = _inputs(kw, hw)
        with torch.no_grad():
            want = ref(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                torch.from_numpy(ctx),
                torch.from_numpy(pooled),
                torch.from_numpy(t),
            ).sample.permute(0, 2, 3, 1)
        got = apply(x, ctx, pooled, t)
        assert got.shape == (2, *hw, kw["out_channels"])
        err = _rel_err(got, want.numpy().astype(np.float64))
        assert err <= 1e-4, f"{case} {hw}: max rel err {err:.2e}"


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    config, sd, _ = _torch_reference(GRAD_KW, tmp_path_factory.mktemp("sd35"))
    return GRAD_KW, config, sd


def test_config_round_trip_and_errors(sd35):
    _, config, sd = sd35
    cfg = MMDiTConfig.from_diffusers(config)
    assert cfg.dual_attention_layers == (1,) and cfg.qk_norm == "rms_norm"
    assert MMDiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert cfg.to_diffusers()["_class_name"] == "SD3Transformer2DModel"
    with pytest.raises(ValueError, match="unsupported SD3Transformer2DModel options"):
        MMDiTConfig.from_diffusers(dict(config, foo=1))
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(**dict(BASE, qk_norm="l2"))
    model = _ours(config, sd)
    with pytest.raises(ValueError, match="hidden_states shape"):
        model(np.zeros((1, 16, 15, 4)), np.zeros((1, 3, 12)), np.zeros((1, 10)), 1.0)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(np.zeros((1, 34, 16, 4)), np.zeros((1, 3, 12)), np.zeros((1, 10)), 1.0)


def _loss_and_grad(model, inputs):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        out = nnx.merge(graphdef, p)(*inputs)
        return jnp.mean(jnp.square(out.astype(jnp.float32))), out

    (value, out), grads = _jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, out, grads


def test_grads_finite_fp32_bf16_and_remat(sd35):
    kw, config, sd = sd35
    inputs = _inputs(kw, (16, 16), batch=1)
    inputs = (*inputs[:3], np.float32(500.0))  # scalar timestep
    base = _loss_and_grad(_ours(config, sd), inputs)
    remat = _loss_and_grad(_ours(config, sd, remat=True), inputs)
    model16 = SD3Transformer(
        MMDiTConfig.from_diffusers(config), rngs=nnx.Rngs(0), dtype=jnp.bfloat16
    )
    load_torch_state_dict(model16, sd)
    bf16 = _loss_and_grad(model16, inputs)

    for value, _out, grads in (base, remat, bf16):
        leaves = jax.tree.leaves(grads)
        assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert all(g.dtype == jnp.float32 for g in leaves)  # fp32 master params
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(base[2])) > 0
    # remat recomputes the same function: same outputs and gradients.
    np.testing.assert_allclose(remat[1], base[1], rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(jax.tree.leaves(remat[2]), jax.tree.leaves(base[2])):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
    # bf16 compute stays close to fp32.
    assert bf16[1].dtype == jnp.bfloat16
    assert _rel_err(bf16[1].astype(jnp.float32), np.asarray(base[1], np.float64)) < 5e-2


def test_sharded_matches_single_device(sd35):
    """Logical names on params/activations: 2x2x2 mesh gives the single-device result."""
    kw, config, sd = sd35
    model = _ours(config, sd)
    inputs = _inputs(kw, (16, 16), batch=2)
    want = _jit_apply(model)(*inputs)  # single device

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    shardings = sharding.param_shardings(state, mesh, min_size=0)
    q_spec = shardings["transformer_blocks"][0]["attn"]["to_q"]["kernel"].get_value().spec
    assert q_spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    state = jax.device_put(state, shardings)
    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        fn = _jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
        text = fn.lower(state, *inputs).as_text()
        got = fn(state, *inputs)
    assert "sharding" in text  # activation constraints were emitted
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
