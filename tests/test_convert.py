"""convert.py: torch state dict <-> NNX on a small hand-written module tree.

The reference is a PyTorch nn.Module (Linear, Conv2d, GroupNorm, LayerNorm, Embedding, nested
nn.ModuleList) mirrored by an NNX module with the same attribute names.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from diffusion.models import convert

C = 8


class TorchBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, C)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.proj = nn.Linear(C, C)

    def forward(self, h):
        h = h + self.conv(torch.nn.functional.silu(self.norm(h)))
        return h + self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, C)
        self.conv_in = nn.Conv2d(3, C, 3, padding=1)
        self.blocks = nn.ModuleList([TorchBlock(), nn.ModuleList([TorchBlock(), TorchBlock()])])
        self.ln = nn.LayerNorm(C)
        self.out = nn.Linear(C, 4, bias=False)
        self.register_buffer("position_ids", torch.arange(5))  # dropped by torch_key_map

    def forward(self, x, ids):
        h = self.conv_in(x) + self.embed(ids)[:, :, None, None]
        h = self.blocks[0](h)
        for block in self.blocks[1]:
            h = block(h)
        return self.out(self.ln(h.mean(dim=(2, 3))))


class Block(nnx.Module):
    def __init__(self, *, rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm = nnx.GroupNorm(C, num_groups=2, epsilon=1e-5, **kw)
        self.conv = nnx.Conv(C, C, (3, 3), padding=((1, 1), (1, 1)), **kw)
        self.proj = nnx.Linear(C, C, **kw)

    def __call__(self, h):  # NHWC
        h = h + self.conv(jax.nn.silu(self.norm(h)))
        return h + self.proj(h)


class Net(nnx.Module):
    def __init__(self, *, rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.embed = nnx.Embed(10, C, **kw)
        self.conv_in = nnx.Conv(3, C, (3, 3), padding=((1, 1), (1, 1)), **kw)
        self.blocks = nnx.List([Block(**kw), nnx.List([Block(**kw), Block(**kw)])])
        self.ln = nnx.LayerNorm(C, epsilon=1e-5, **kw)
        self.out = nnx.Linear(C, 4, use_bias=False, **kw)

    @staticmethod
    def torch_key_map(key):
        return None if key == "position_ids" else key

    def __call__(self, x, ids):
        h = self.conv_in(x) + self.embed(ids)[:, None, None, :]
        h = self.blocks[0](h)
        for block in self.blocks[1]:
            h = block(h)
        return self.out(self.ln(h.mean(axis=(1, 2))))


def _randomize(module, seed):
    """Random weights everywhere (norm scales/biases too, so they are exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


@pytest.fixture(scope="module")
def torch_net():
    return _randomize(TorchNet().eval(), 0)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)  # NCHW
    ids = np.array([1, 7])
    return x, ids


def _torch_out(net, x, ids):
    with torch.no_grad():
        return net(torch.from_numpy(x), torch.from_numpy(ids)).numpy()


def _ours_out(net, x, ids):
    return np.asarray(net(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids)))


def _rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_load_matches_torch(torch_net, inputs):
    ours = Net(rngs=nnx.Rngs(0))
    convert.load_torch_state_dict(ours, torch_net.state_dict())
    ref = _torch_out(torch_net, *inputs)
    assert _rel_err(_ours_out(ours, *inputs), ref) <= 1e-5
    # The nested ModuleList key really landed where expected (layout transposed).
    w = torch_net.blocks[1][0].conv.weight.detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(ours.blocks[1][0].conv.kernel), w.transpose(2, 3, 1, 0)
    )


def test_load_into_abstract_model_and_cast(torch_net, inputs):
    """eval_shape'd module is fully filled; values are cast to the param dtype (bf16 torch ok)."""
    ours = nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    sd = {k: v.to(torch.bfloat16) for k, v in torch_net.state_dict().items()}
    convert.load_torch_state_dict(ours, sd)
    params = nnx.state(ours, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(x, jax.Array) and x.dtype == jnp.bfloat16 for x in leaves)
    ref = _torch_out(torch_net, *inputs)
    assert _rel_err(_ours_out(ours, *inputs), ref) <= 5e-2  # bf16 weights


def test_errors_name_every_offending_tensor(torch_net):
    sd = dict(torch_net.state_dict())
    del sd["blocks.1.0.norm.weight"]  # missing
    sd["blocks.1.2.proj.weight"] = torch.zeros(8, 8)  # unexpected
    sd["blocks.0.conv.weight"] = torch.zeros(8, 8, 1, 1)  # mis-shaped
    sd["embed.weight"] = torch.zeros(11, 8)  # mis-shaped
    ours = Net(rngs=nnx.Rngs(0))
    before = np.asarray(ours.conv_in.kernel).copy()
    with pytest.raises(convert.StateDictError) as info:
        convert.load_torch_state_dict(ours, sd)
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 2 mis-shaped" in msg
    assert "blocks.1.0.norm.weight" in msg and "(8,)" in msg
    assert "blocks.1.2.proj.weight" in msg
    assert "blocks.0.conv.weight: checkpoint shape (8, 8, 1, 1) vs model shape (8, 8, 3, 3)" in msg
    assert "embed.weight: checkpoint shape (11, 8) vs model shape (10, 8)" in msg
    # Nothing was written on failure.
    np.testing.assert_array_equal(np.asarray(ours.conv_in.kernel), before)


def test_non_strict_allows_missing_and_unexpected(torch_net):
    sd = dict(torch_net.state_dict())
    del sd["ln.bias"]
    sd["extra"] = torch.zeros(3)
    ours = Net(rngs=nnx.Rngs(0))
    ln_bias = np.asarray(ours.ln.bias).copy()
    convert.load_torch_state_dict(ours, sd, strict=False)
    np.testing.assert_array_equal(np.asarray(ours.ln.bias), ln_bias)
    np.testing.assert_array_equal(np.asarray(ours.out.kernel), sd["out.weight"].numpy().T)
    sd["ln.weight"] = torch.zeros(9)  # shape errors are errors even when not strict
    with pytest.raises(convert.StateDictError, match="ln.weight"):
        convert.load_torch_state_dict(ours, sd, strict=False)


def test_round_trip_to_torch(torch_net, inputs):
    ours = Net(rngs=nnx.Rngs(0))
    convert.load_torch_state_dict(ours, torch_net.state_dict())
    sd = convert.to_torch_state_dict(ours)
    assert "position_ids" not in sd
    assert set(sd) == set(torch_net.state_dict()) - {"position_ids"}
    fresh = _randomize(TorchNet().eval(), 1)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    for k, v in torch_net.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    np.testing.assert_array_equal(_torch_out(fresh, *inputs), _torch_out(torch_net, *inputs))
    shapes = convert.abstract_torch_state_dict(nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0))))
    assert {k: s for k, (s, _) in shapes.items()} == {k: v.shape for k, v in sd.items()}
