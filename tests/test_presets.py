"""Full-size presets: our parameter counts equal the diffusers/transformers PyTorch counts.

Nothing is allocated: ours via nnx.eval_shape, theirs on torch's meta device.
"""

import functools
import math

import diffusers
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

import diffusion.models as models
from diffusion.models import presets


def torch_param_count(config: dict) -> int:
    name = presets.class_name(config)
    with torch.device("meta"):
        if name.startswith("CLIP"):
            hf_config = transformers.CLIPTextConfig(
                **{k: v for k, v in config.items() if k != "architectures"}
            )
            module = getattr(transformers, name)(hf_config)
        else:
            module = getattr(diffusers, name).from_config(config)
    return sum(p.numel() for p in module.parameters())


@functools.cache
def preset_torch_count(name: str) -> int:
    return torch_param_count(presets.get_preset(name))


@functools.cache
def _preset_abstract(name: str):
    return our_abstract(presets.get_preset(name))


def our_abstract(config: dict):
    cls, config_cls = models.get_model(presets.class_name(config))
    cfg = config_cls.from_diffusers(config)
    return cls, cfg, models.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def our_param_count(module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_param_count_matches_pytorch(name):
    _, _, module = _preset_abstract(name)
    assert our_param_count(module) == preset_torch_count(name)


def test_sd15_unet_count_is_the_published_one():
    assert preset_torch_count("sd15-unet") == 859_520_964
    _, _, module = _preset_abstract("sd15-unet")
    assert our_param_count(module) == 859_520_964


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_config_round_trip(name):
    """from_diffusers(to_diffusers(cfg)) == cfg, and diffusers accepts what we write."""
    _, cfg, _ = _preset_abstract(name)
    written = cfg.to_diffusers()
    assert presets.class_name(written) == presets.class_name(presets.PRESETS[name])
    assert type(cfg).from_diffusers(written) == cfg
    assert torch_param_count(written) == preset_torch_count(name)


def test_bf16_params_are_bf16():
    config = presets.get_preset("sd-vae")
    cls, config_cls = models.get_model(presets.class_name(config))
    cfg = config_cls.from_diffusers(config)
    module = models.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(module, nnx.Param))} == {
        jnp.dtype(jnp.bfloat16)
    }


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="sd15-unet.*openclip-g"):
        presets.get_preset("sd9")
    a = presets.get_preset("sd15-unet")
    a["block_out_channels"].append(1)  # a copy: the preset itself is untouched
    assert presets.PRESETS["sd15-unet"]["block_out_channels"] == [320, 640, 1280, 1280]


def test_unknown_model_class_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model class 'Foo'; known classes"):
        models.get_model("Foo")
