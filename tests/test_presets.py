"""Full-size presets: our parameter counts equal the diffusers/transformers PyTorch counts.

Nothing is allocated: ours via nnx.eval_shape, theirs on torch's meta device.
"""

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

# Which file provides each class (for the skip message while a model file has not landed).
_MODULE_OF = {
    "UNet2DConditionModel": "diffusion/models/unet.py",
    "UNet2DModel": "diffusion/models/unet.py",
    "AutoencoderKL": "diffusion/models/vae.py",
    "SD3Transformer2DModel": "diffusion/models/mmdit.py",
    "CLIPTextModel": "diffusion/models/text.py",
    "CLIPTextModelWithProjection": "diffusion/models/text.py",
}


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


def our_abstract(config: dict):
    name = presets.class_name(config)
    if name not in models.MODELS:
        pytest.skip(f"{name} not implemented yet ({_MODULE_OF[name]} not registered)")
    cls, config_cls = models.get_model(name)
    cfg = config_cls.from_diffusers(config)
    return cls, cfg, nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def our_param_count(module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_param_count_matches_pytorch(name):
    config = presets.get_preset(name)
    _, _, module = our_abstract(config)
    assert our_param_count(module) == torch_param_count(config)


def test_sd15_unet_count_is_the_published_one():
    assert torch_param_count(presets.get_preset("sd15-unet")) == 859_520_964
    _, _, module = our_abstract(presets.get_preset("sd15-unet"))
    assert our_param_count(module) == 859_520_964


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_config_round_trip(name):
    """from_diffusers(to_diffusers(cfg)) == cfg, and diffusers accepts what we write."""
    config = presets.get_preset(name)
    _, cfg, _ = our_abstract(config)
    written = cfg.to_diffusers()
    assert presets.class_name(written) == presets.class_name(config)
    assert type(cfg).from_diffusers(written) == cfg
    assert torch_param_count(written) == torch_param_count(config)


def test_bf16_params_are_bf16():
    config = presets.get_preset("sd-vae")
    name = presets.class_name(config)
    if name not in models.MODELS:
        pytest.skip(f"{name} not implemented yet")
    cls, config_cls = models.get_model(name)
    cfg = config_cls.from_diffusers(config)
    module = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(module, nnx.Param))} == {jnp.bfloat16}


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError, match="sd15-unet.*openclip-g"):
        presets.get_preset("sd9")
    a = presets.get_preset("sd15-unet")
    a["block_out_channels"].append(1)  # a copy: the preset itself is untouched
    assert presets.PRESETS["sd15-unet"]["block_out_channels"] == [320, 640, 1280, 1280]


def test_unknown_model_class_lists_known_ones():
    with pytest.raises(KeyError, match="unknown model class 'Foo'; known classes"):
        models.get_model("Foo")
