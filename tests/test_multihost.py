"""Two JAX processes on 127.0.0.1 (jax.distributed + gloo CPU collectives, 4 CPU devices each)
train FSDP-sharded steps on a global batch built from per-process shards, checkpoint and
restore, and must match the same run in this single 8-device process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from multihost_worker import flat_params, train

from diffusion import sharding

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
NUM_STEPS = 3
TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(workdir, num_processes=2):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), str(num_processes), str(port), str(workdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{out[-4000:]}"


def test_two_processes_match_one(tmp_path):
    _run_workers(tmp_path)
    result = np.load(tmp_path / f"result_{2}.npz")
    state, losses, _ = train(sharding.make_mesh({"fsdp": 8}), NUM_STEPS)
    ref_params = flat_params(state)
    dloss = float(np.max(np.abs(result["losses"] - np.array(losses))))
    dparam = max(float(np.max(np.abs(result[f"param{k}"] - v))) for k, v in ref_params.items())
    print(f"2 processes x 4 devices: losses {result['losses']}, 1 process: {np.array(losses)}")
    print(f"max |dloss| {dloss:.2e}, max |dparam| {dparam:.2e}")
    assert len(ref_params) == len([k for k in result.files if k.startswith("param")])
    assert dloss <= 1e-5 and dparam <= 1e-5
    assert jax.process_count() == 1
