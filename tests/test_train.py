"""The training loop end to end on tiny configs: sharded runs equal to one device, NaN stop, and
bad-input errors (exact resume after SIGKILL is in test_train_resume.py, so that the two slowest
tests run on different xdist workers)."""

import json
import os

import numpy as np
import pytest

from configs import digits_unet_eps
from diffusion import checkpoint, data, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", d)
    return d


def tiny_config(data_dir, **over):
    c = digits_unet_eps.get_config("runlocal")
    c.data.data_dir = data_dir
    c.data.batch_size = 16
    c.sample.every = 0
    c.log_every = 1
    c.mesh = {
        "data": 1,
        "fsdp": 1,
        "tensor": 1,
        "num_devices": 1,
    }  # 8-device SPMD compiles are slow
    for k, v in over.items():
        node, *path = k.split(".")
        target = c if not path else c[node]
        target[path[-1] if path else node] = v
    return c


def _losses(workdir):
    recs = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([r["loss"] for r in recs if "loss" in r])


def test_sharded_training_matches_one_device(tmp_path, data_dir):
    # Every mesh axis in one run (each 8-device SPMD compile costs a minute or more here).
    meshes = {
        "one": {"data": 1, "fsdp": 1, "tensor": 1, "num_devices": 1},
        "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    }
    losses, bytes_per_device = {}, {}
    for name, mesh in meshes.items():
        cfg = tiny_config(data_dir, total_steps=5, ckpt_every=100, fsdp_min_size=256)
        cfg.mesh = mesh
        out = train.train(cfg, str(tmp_path / name))
        losses[name] = _losses(tmp_path / name)
        from diffusion import sharding

        bytes_per_device[name] = max(sharding.per_device_bytes(out["state"]["params"]).values())
    print("max parameter bytes per device:", bytes_per_device)
    for name in meshes:
        assert len(losses[name]) == 5
        np.testing.assert_allclose(losses[name], losses["one"], atol=1e-5, rtol=0, err_msg=name)
    # params really sharded: a device holds well under all of them ("one" holds them all)
    assert bytes_per_device["data2_fsdp2_tensor2"] < 0.6 * bytes_per_device["one"]


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    wd = str(tmp_path / "run")
    train.train(tiny_config(data_dir, total_steps=2, ckpt_every=1), wd)
    bad = tiny_config(data_dir, total_steps=4, ckpt_every=1)
    bad.optim.lr = float("nan")
    with pytest.raises(
        train.NonFiniteLossError, match=r"at step 3.*last good checkpoint is step 2"
    ):
        train.train(bad, wd)
    with checkpoint.Checkpointer(os.path.join(wd, "checkpoints")) as ck:
        assert ck.all_steps() == [1, 2]
    # a checkpoint from a different model config fails naming the parameter and shapes
    other = tiny_config(data_dir, total_steps=3)
    other.model.config = digits_unet_eps.unet(channels=(16, 32, 48))
    with pytest.raises(ValueError, match=r"parameter params/.*has shape \(.*\) in the checkpoint"):
        train.train(other, wd)


def test_bad_config_errors(tmp_path, data_dir):
    cfg = tiny_config(data_dir)
    cfg.ema_decy = 0.9  # a typo'd key
    with pytest.raises(ValueError, match="unknown config keys.*ema_decy"):
        train.train(cfg, str(tmp_path / "a"))
    locked = digits_unet_eps.get_config("runlocal")
    locked.lock()
    with pytest.raises(AttributeError):
        locked.optim.lrr = 1.0  # what --config.optim.lrr=1 hits on the command line
    for key, value, pattern in [
        ("data.name", "not_a_dataset", "digits"),
        ("objective.prediction_type", "noise", "valid"),
        ("sample.method", "not_a_sampler", "valid"),
    ]:
        bad = tiny_config(data_dir, total_steps=1, **{key: value})
        with pytest.raises(ValueError, match=pattern):
            train.train(bad, str(tmp_path / key))
    bad = tiny_config(data_dir)
    bad.model.class_name = "NotAModel"
    with pytest.raises(ValueError, match="UNet2DModel"):
        train.train(bad, str(tmp_path / "m"))
    with pytest.raises(ValueError, match="unknown variants"):
        digits_unet_eps.get_config("runlocal,typo")
