"""Tasks and conditioning chosen once from the config: each conditioning hands the model its
diffusers-named keyword arguments (checked against calling the modules directly), bad names list
the valid ones, and the EMA warm-up follows its formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, digits_unet_eps, shapes_mmdit_flow, shapes_unet_text
from diffusion import conditioning, tasks
from diffusion.train_state import ema_update


def _tokens(task, captions):
    return jnp.asarray(task.conditioning.tokenizer(captions))


def test_text_conditioning_feeds_unet_token_states():
    """SD1-style: encoder_hidden_states = CLIPTextModel's final states, no pooled input."""
    task = tasks.from_config(shapes_unet_text.get_config("runlocal"))
    model = task.build_model(nnx.Rngs(0))
    assert isinstance(model, conditioning.TextConditioned)
    ids = _tokens(task, ["a red circle at the top on a black background", ""])
    kw = task.conditioning.kwargs(model, {"input_ids": ids})
    assert set(kw) == {"encoder_hidden_states"}
    last, _ = model.text_encoder(ids)
    np.testing.assert_array_equal(kw["encoder_hidden_states"], last)
    x, t = jnp.ones((2, 32, 32, 3)), jnp.asarray([10.0, 500.0])
    got = task.model_fn(model, x, t, {"input_ids": ids})
    np.testing.assert_array_equal(got, model.denoiser(x, t, last))


def test_text_conditioning_feeds_mmdit_pooled_and_states():
    """SD3-style: the projected pooled embedding and the token states."""
    task = tasks.from_config(shapes_mmdit_flow.get_config("runlocal"))
    model = task.build_model(nnx.Rngs(0))
    ids = _tokens(task, ["a blue square at the left on a gray background"])
    kw = task.conditioning.kwargs(model, {"input_ids": ids})
    embeds, last = model.text_encoder(ids)
    assert set(kw) == {"encoder_hidden_states", "pooled_projections"}
    np.testing.assert_array_equal(kw["pooled_projections"], embeds)
    np.testing.assert_array_equal(kw["encoder_hidden_states"], last)


def test_penultimate_states_and_sdxl_added_cond_kwargs():
    """hidden_state=-2 takes the penultimate layer's states; pooled_as="added_cond_kwargs" gives
    SDXL's {"text_embeds", "time_ids"} with (H, W, 0, 0, H, W)."""
    cfg = shapes_mmdit_flow.get_config("runlocal")
    text = conditioning.from_config(
        {
            **cfg.conditioning.to_dict(),
            "hidden_state": -2,
            "pooled_as": "added_cond_kwargs",
            "image_size": 32,
        }  # fmt: skip
    )
    encoder = text.encoder.build(nnx.Rngs(0))
    model = conditioning.TextConditioned(encoder, None)
    ids = jnp.asarray(text.tokenizer(["a red circle above a blue square on a black background"]))
    kw = text.kwargs(model, {"input_ids": ids})
    embeds, _, states = encoder(ids, output_hidden_states=True)
    np.testing.assert_array_equal(kw["encoder_hidden_states"], states[-2])
    np.testing.assert_array_equal(kw["added_cond_kwargs"]["text_embeds"], embeds)
    np.testing.assert_array_equal(kw["added_cond_kwargs"]["time_ids"], [[32, 32, 0, 0, 32, 32]])


def test_class_conditioning_and_null_label():
    task = tasks.from_config(digits_unet_eps.get_config("runlocal"))
    batch = task.prepare_batch({"image": np.zeros((3, 8, 8, 1)), "label": np.array([1, 2, 3])})
    assert set(batch) == {"x", "class_labels"} and batch["class_labels"].dtype == np.int32
    assert int(task.conditioning.null()["class_labels"]) == 10  # the extra "null" class
    assert task.grid_columns == 10


def test_bad_names_list_valid_ones():
    cfg = digits_unet_eps.get_config("runlocal")
    cfg.task = "segmentation"
    with pytest.raises(ValueError, match=r"unknown task 'segmentation'.*autoencoder.*diffusion"):
        tasks.from_config(cfg)
    cfg = digits_unet_eps.get_config("runlocal")
    cfg.conditioning.name = "audio"
    with pytest.raises(ValueError, match=r"unknown conditioning 'audio'.*'class'.*'text'"):
        tasks.from_config(cfg)
    with pytest.raises(ValueError, match=r"unknown variants \['size=3'\].*runlocal"):
        digits_unet_eps.get_config("runlocal,size=3")
    with pytest.raises(ValueError, match=r"expected int"):
        common.parse("steps=many", steps=10)
    assert common.parse("steps=20,fast", flags=("fast",), steps=10).to_dict() == {
        "fast": True,
        "steps": 20,
    }


def test_ema_warmup_formula():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    for step in (0, 5, 1000):
        d = min(0.999, (1 + step) / (10 + step))
        got = ema_update(ema, params, 0.999, jnp.asarray(step), warmup=True)["w"]
        np.testing.assert_allclose(got, 1.0 - d, rtol=1e-6)
    plain = ema_update(ema, params, 0.999, 0)["w"]
    np.testing.assert_allclose(plain, 0.001, rtol=1e-6)
    assert jax.tree.structure(plain) == jax.tree.structure(jnp.zeros(3))
