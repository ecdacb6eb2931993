"""The ControlNet fine-tuning run on the tiny latent text-to-image run (tests/_ldm_fixtures.py):
configs/shapes_controlnet.py:runlocal shortened to 3 steps. It starts as the base U-Net exactly
(zero convolutions), only the ControlNet's weights move, and eval_finetune scores it with and
without control. (A file of its own so that pytest-xdist's --dist loadfile can run it beside the
LoRA / DreamBooth tests in tests/test_adapters_train.py.)
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _ldm_fixtures import finetune_run, flat_params, jit_call
from flax import nnx
from PIL import Image

from configs import shapes_controlnet
from diffusion import sharding, tasks
from diffusion.adapters import control
from diffusion.train_state import from_pretrained, frozen_weights, restore_ema, state_fns
from diffusion.workdir import read_config


def test_controlnet_starts_as_the_base_and_trains(tiny_ldm, tmp_path):
    cfg = shapes_controlnet.get_config("runlocal")
    summary = finetune_run(cfg, "controlnet", tiny_ldm, tmp_path)
    task = tasks.from_config(read_config(str(tmp_path)))
    base_task, base_model = task.base()

    # Step 0 (the state train.py builds): the controlled U-Net predicts what the base does.
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    graphdef, init_fn = state_fns(task, optax.sgd(0.0), cfg.seed)
    state = from_pretrained(task, jax.jit(init_fn)())  # one compiled init, not eager ops
    frozen = frozen_weights(task, cfg.seed, mesh)
    model = nnx.merge(graphdef, state["params"], frozen, state["rest"])
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 16, 16, 4))  # latents of 32 px images
    ids = jnp.asarray(base_task.conditioning.tokenizer(["a red circle", "a blue square"]))
    layout = jax.random.bernoulli(keys[1], 0.3, (2, 32, 32, 3)).astype(jnp.float32)
    t = jnp.asarray([100.0, 700.0])
    want = jit_call(lambda m: base_task.model_fn(m, x, t, {"input_ids": ids}), base_model)
    got = jit_call(
        lambda m: task.model_fn(control._WithControl(m, layout), x, t, {"input_ids": ids}), model
    )
    np.testing.assert_array_equal(got, want)

    # After training: only the ControlNet moved (zero convolutions left zero).
    trained, _ = restore_ema(read_config(str(tmp_path)), task, str(tmp_path))
    assert summary["trained_params"] == sum(
        v.size for v in flat_params(trained.controlnet).values()
    )
    after = flat_params(trained)
    for p, v in flat_params(base_model).items():
        np.testing.assert_array_equal(after[p], v, err_msg=str(p))
    zero = flat_params(trained.controlnet.controlnet_mid_block)
    assert all(np.abs(v).max() > 0 for v in zero.values())

    # eval_finetune: the same test examples with and without control, IoU with their layouts
    from experiments import eval_finetune

    r = eval_finetune.evaluate(str(tmp_path), num_control=3)
    assert r["kind"] == "controlnet" and r["num_examples"] == 3
    for who in ("base", "controlled"):
        assert 0.0 <= r[who]["mask_iou"] <= 1.0 and 0.0 <= r[who]["adherence"] <= 1.0
    saved = json.loads((tmp_path / "eval_finetune.json").read_text())
    assert saved["controlled"] == r["controlled"]
    grid = Image.open(tmp_path / "eval_finetune.png")  # control, base, controlled rows of 3
    assert grid.size == (360 + 3 * (2 * 32 + 6), 3 * (2 * 32 + 6))
