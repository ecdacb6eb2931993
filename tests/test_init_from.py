"""Warm start (config key `init_from`): a text-to-image run starts from a trained run's EMA
weights or a pipeline folder, with a fresh optimizer and schedule (diffusion/train.py,
train_state.init_weights); a model of another structure is refused, naming parameters."""

import numpy as np
import pytest
from _ldm_fixtures import flat_params, short

from configs import shapes_ldm_mmdit, shapes_ldm_unet
from diffusion import tasks, train
from diffusion.adapters import base
from diffusion.train_state import init_weights, restore_ema
from diffusion.workdir import read_config


def test_init_from_starts_at_the_trained_weights(tiny_ldm, tmp_path):
    vae_dir, ldm_dir, data_dir, _ = tiny_ldm
    cfg = short(shapes_ldm_unet.get_config("runlocal"), data_dir, 2)
    cfg.latents.vae, cfg.init_from = str(vae_dir), str(ldm_dir)
    cfg.optim.lr = 0.0  # the parameters never move: the run ends where it started
    cfg.sample.every = 0
    wd = str(tmp_path / "continued")
    train.train(cfg, wd)

    want = flat_params(base.load_base(str(ldm_dir))[1])
    got = flat_params(restore_ema(read_config(wd), tasks.from_config(read_config(wd)), wd)[0])
    assert got.keys() == want.keys()
    for path, value in want.items():  # a fresh initialisation would differ everywhere
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=str(path))


def test_init_from_a_model_of_another_structure_is_refused(tiny_ldm):
    vae_dir, ldm_dir, data_dir, _ = tiny_ldm
    cfg = shapes_ldm_mmdit.get_config("runlocal")
    cfg.latents.vae, cfg.data.data_dir = str(vae_dir), str(data_dir)
    with pytest.raises(ValueError, match=r"not this config.s .*context_embedder.*conv_in"):
        init_weights(tasks.from_config(cfg), str(ldm_dir))  # a U-Net run into an MMDiT
