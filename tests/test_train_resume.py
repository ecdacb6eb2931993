"""Exact resume: a training run killed with SIGKILL at a random point after its first checkpoint
and restarted (`python -m experiments.train`, automatic resume from the workdir) ends
bit-identical to an uninterrupted run of the same config."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion import checkpoint, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", d)
    return d


def _cli(workdir, data_dir, steps=12):
    args = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        "configs/digits_unet_eps.py:runlocal",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        f"--config.total_steps={steps}",
        "--config.ckpt_every=4",
        "--config.sample.every=0",
        "--config.log_every=4",
    ]
    flags = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags}  # one device; cheap compiles as in conftest
    return args, env


def _final_state(workdir, step):
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
        return ck.restore(step=step).state


def test_exact_resume_after_sigkill(tmp_path, data_dir):
    """A run killed with SIGKILL at a random point after its first checkpoint and restarted ends
    bit-identical (params, EMA, optimizer, step, RNG) to an uninterrupted run."""
    args, env = _cli(tmp_path / "straight", data_dir)
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    args, env = _cli(tmp_path / "killed", data_dir)
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = tmp_path / "killed" / "checkpoints" / "4" / "commit_success.txt"
    deadline = time.time() + 500
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(random.uniform(0.0, 1.0))
    killed_early = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_early, "the run finished before it could be killed"
    out = subprocess.run(
        args, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600
    )
    assert "resumed from step" in out.stdout + out.stderr
    a, b = _final_state(tmp_path / "straight", 12), _final_state(tmp_path / "killed", 12)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
