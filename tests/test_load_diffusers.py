"""load_diffusers / save_diffusers end to end against diffusers/transformers PyTorch classes.

Tiny random PyTorch models of each registered class are saved with ``save_pretrained`` (single
file and sharded), read with ``load_diffusers`` and run on the same inputs; our files go back
through ``<Class>.from_pretrained``.
"""

import json
import os

import diffusers
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import diffusion.models as models
from diffusion.models import convert

# name -> (PyTorch constructor, kwargs)
TINY = {
    "UNet2DConditionModel": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "UNet2DModel": dict(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
    "AutoencoderKL": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ),
    "SD3Transformer2DModel": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
    ),
    "CLIPTextModel": dict(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, projection_dim=24, eos_token_id=2,
    ),
}  # fmt: skip
TINY["CLIPTextModelWithProjection"] = TINY["CLIPTextModel"]


def make_torch(name):
    torch.manual_seed(0)
    if name.startswith("CLIP"):
        model = getattr(transformers, name)(transformers.CLIPTextConfig(**TINY[name]))
    else:
        model = getattr(diffusers, name)(**TINY[name])
    with torch.no_grad():  # perturb everything, so norms and zero-initialised layers matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_inputs(name):
    """(torch args, our args) for one forward pass."""
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    nhwc = lambda x: x.transpose(0, 2, 3, 1)
    t = np.array([3.0, 700.0], np.float32)
    if name == "UNet2DConditionModel":
        x, ctx = f32(2, 4, 8, 8), f32(2, 5, 16)
        return (x, t, ctx), (nhwc(x), t, ctx)
    if name == "UNet2DModel":
        x = f32(2, 3, 8, 8)
        return (x, t), (nhwc(x), t)
    if name == "AutoencoderKL":
        x = f32(2, 3, 16, 16)
        return (x,), (nhwc(x),)
    if name == "SD3Transformer2DModel":
        x, ctx, pooled = f32(2, 4, 8, 8), f32(2, 5, 16), f32(2, 16)
        return (x, ctx, pooled, t), (nhwc(x), ctx, pooled, t)
    ids = rng.integers(3, 99, size=(2, 7))
    return (ids,), (ids,)


def torch_outputs(name, model, args):
    with torch.no_grad():
        out = model(*[torch.from_numpy(np.asarray(a)) for a in args])
    if name.startswith("CLIPTextModelWith"):
        return [out.text_embeds.numpy(), out.last_hidden_state.numpy()]
    if name.startswith("CLIP"):
        return [out.last_hidden_state.numpy(), out.pooler_output.numpy()]
    return [out.sample.numpy().transpose(0, 2, 3, 1)]  # NCHW -> NHWC


def our_outputs(model, args):
    out = nnx.jit(lambda m, *a: m(*a))(model, *args)
    return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=list(TINY))
def case(request, tmp_path_factory):
    """A tiny PyTorch model saved single-file and sharded, plus its reference outputs."""
    name = request.param
    model = make_torch(name)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    torch_args, our_args = make_inputs(name)
    return dict(
        name=name, root=root, torch_model=model, our_args=our_args,
        ref=torch_outputs(name, model, torch_args), torch_args=torch_args,
    )  # fmt: skip


def test_load_matches_pytorch(case):
    ours = models.load_diffusers(str(case["root"] / "single"))
    assert type(ours) is models.MODELS[case["name"]][0]
    outs = our_outputs(ours, case["our_args"])
    assert len(outs) >= len(case["ref"])
    for a, b in zip(outs, case["ref"]):
        assert a.shape == b.shape
        assert rel_err(a, b) <= 1e-4


def test_sharded_equals_single_file(case):
    sharded = case["root"] / "sharded"
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(sharded))
    a = nnx.state(models.load_diffusers(str(case["root"] / "single")), nnx.Param)
    b = nnx.state(models.load_diffusers(str(sharded)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("shard", ["single", "sharded"])
def test_save_then_from_pretrained(case, shard, tmp_path):
    name = case["name"]
    ours = models.load_diffusers(str(case["root"] / "single"))
    kw = {"max_shard_size": "20KB"} if shard == "sharded" else {}
    models.save_diffusers(ours, str(tmp_path), **kw)
    assert (len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1) == (
        shard == "sharded"
    )
    lib = transformers if name.startswith("CLIP") else diffusers
    reloaded, info = getattr(lib, name).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing re-initialised
    reloaded = reloaded.eval()
    got = torch_outputs(name, reloaded, case["torch_args"])
    for a, b in zip(got, case["ref"]):
        np.testing.assert_array_equal(a, b)
    # and back into ours: identical parameters
    again = models.load_diffusers(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours, nnx.Param),
                 nnx.state(again, nnx.Param))  # fmt: skip


def _copy_with(src, dst, edit):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    files = [f for f in os.listdir(src) if f.endswith(".safetensors")]
    state = safetensors.numpy.load_file(os.path.join(src, files[0]))
    config = edit(config, state)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    safetensors.numpy.save_file(state, os.path.join(dst, files[0]), metadata={"format": "pt"})


def test_errors_name_tensors_and_shapes(tmp_path):
    model = make_torch("UNet2DConditionModel")
    model.save_pretrained(tmp_path / "src")

    def edit(config, state):
        del state["conv_in.bias"]
        state["down_blocks.0.extra.weight"] = np.zeros((3, 2), np.float32)
        state["conv_out.weight"] = np.zeros((4, 16, 1, 1), np.float32)
        return config

    _copy_with(tmp_path / "src", tmp_path / "bad", edit)
    with pytest.raises(convert.StateDictError) as info:
        models.load_diffusers(str(tmp_path / "bad"))
    msg = str(info.value)
    assert "missing:    conv_in.bias (model shape (16,)" in msg
    assert "unexpected: down_blocks.0.extra.weight (checkpoint shape (3, 2))" in msg
    assert "conv_out.weight: checkpoint shape (4, 16, 1, 1) vs model shape (4, 16, 3, 3)" in msg


def test_unknown_class_name_lists_known(tmp_path):
    make_torch("AutoencoderKL").save_pretrained(tmp_path / "src")

    def edit(config, state):
        return {**config, "_class_name": "FooModel"}

    _copy_with(tmp_path / "src", tmp_path / "bad", edit)
    with pytest.raises(ValueError, match="'FooModel'; known classes: AutoencoderKL, CLIPTextModel"):
        models.load_diffusers(str(tmp_path / "bad"))
    os.makedirs(tmp_path / "src_no_weights")
    os.rename(tmp_path / "src" / "config.json", tmp_path / "src_no_weights" / "config.json")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        models.load_diffusers(str(tmp_path / "src_no_weights"))


def test_convert_weights_tool_round_trip(tmp_path):
    """tools.convert_weights: diffusers -> NNX orbax -> diffusers, then from_pretrained."""
    from tools import convert_weights

    name = "CLIPTextModelWithProjection"
    model = make_torch(name)
    model.save_pretrained(tmp_path / "src")
    convert_weights.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "nnx")])
    assert convert_weights.is_nnx_checkpoint(str(tmp_path / "nnx"))
    convert_weights.main(
        ["--src", str(tmp_path / "nnx"), "--dst", str(tmp_path / "out"), "--to", "torch"]
    )
    args, _ = make_inputs(name)
    reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "out"))
    for a, b in zip(torch_outputs(name, reloaded.eval(), args), torch_outputs(name, model, args)):
        np.testing.assert_array_equal(a, b)
