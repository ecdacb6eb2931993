"""Tiny NNX model + sharded train step shared by the sharding/checkpoint tests, and the
worker process of tests/test_multihost.py.

As a script: `python tests/multihost_worker.py <process_id> <num_processes> <port> <workdir>`
joins a jax.distributed run on 127.0.0.1 (each process has its own CPU devices; the caller
sets XLA_FLAGS/JAX_PLATFORMS), trains a few FSDP-sharded steps on a global batch assembled
from per-process shards, saves and restores a checkpoint onto another mesh, and process 0
writes losses and final params to <workdir>/result_<num_processes>.npz.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusion import sharding  # noqa: E402

BATCH, SIZE, CH, WIDTH, HIDDEN = 16, 8, 4, 32, 64
MIN_SIZE = 256  # FSDP-by-size threshold used by the tests (elements)


class TinyNet(nnx.Module):
    """conv -> per-pixel MLP (logically annotated) -> conv; big enough to shard on 8 devices."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv_in = nnx.Conv(CH, WIDTH, (3, 3), rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.fc1 = nnx.Linear(
            WIDTH, HIDDEN, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs
        )
        self.fc2 = nnx.Linear(
            HIDDEN, WIDTH, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs
        )
        self.conv_out = nnx.Conv(WIDTH, CH, (3, 3), rngs=rngs)

    def __call__(self, x):  # x: (B, H, W, C)
        h = jax.nn.gelu(self.conv_in(x))  # (B, H, W, WIDTH)
        h = h + self.fc2(jax.nn.gelu(self.fc1(h)))  # (B, H, W, WIDTH)
        return self.conv_out(h)  # (B, H, W, C)


def make_tx():
    return optax.adamw(1e-2, weight_decay=1e-2)


def init_state(seed: int = 0):
    """Train state pytree: params, EMA params, adamw state, step, typed RNG key."""
    model = TinyNet(nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    return {
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),
        "opt": make_tx().init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key(seed + 1),
    }


def graphdef():
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: TinyNet(nnx.Rngs(0))))[0]


def train_step(state, batch, gdef):
    """One adamw step on an MSE regression; pure function of (state, batch)."""

    def loss_fn(params):
        out = nnx.merge(gdef, params)(batch["x"])
        return jnp.mean((out - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = make_tx().update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state["ema"], params)
    rng, _ = jax.random.split(state["rng"])
    new = {"params": params, "ema": ema, "opt": opt, "step": state["step"] + 1, "rng": rng}
    return new, loss


def compiled_step(mesh, state_shardings):
    """train_step under jax.jit with explicit in/out shardings and a donated state."""
    gdef = graphdef()
    return jax.jit(
        lambda s, b: train_step(s, b, gdef),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def make_batches(num_steps: int, seed: int = 0):
    """Deterministic global batches (numpy); the target is a fixed nonlinear map of x."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_steps):
        x = rng.standard_normal((BATCH, SIZE, SIZE, CH)).astype(np.float32)
        out.append({"x": x, "y": np.tanh(np.roll(x, 1, axis=-1))})
    return out


def train(mesh, num_steps: int, process_slice=None):
    """Sharded init + `num_steps` steps; returns (state, losses, state_shardings).

    process_slice(global_batch) -> this process's rows (multi-process) or None (one process).
    """
    with nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(init_state)
    shardings = sharding.param_shardings(abstract, mesh, min_size=MIN_SIZE)
    state = sharding.shard_init(init_state, mesh, shardings)
    step = compiled_step(mesh, shardings)
    losses = []
    for batch in make_batches(num_steps):
        if process_slice is None:
            batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        else:
            batch = sharding.make_global_batch(process_slice(batch), mesh)
        state, loss = step(state, batch)
        losses.append(float(loss))
    return state, losses, shardings


def flat_params(state) -> dict[str, np.ndarray]:
    """Host copies of all params (one all-gather of the whole tree across processes)."""
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(state["params"], tiled=True)
    leaves = jax.tree_util.tree_flatten_with_path(gathered)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def main(process_id: int, num_processes: int, port: int, workdir: str, num_steps: int = 3):
    from jax.experimental import multihost_utils

    from diffusion.checkpoint import Checkpointer

    sharding.initialize_distributed(
        f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=120
    )
    assert jax.process_count() == num_processes and jax.device_count() == 8
    mesh = sharding.make_mesh({"fsdp": 8})
    rows = BATCH // num_processes

    def process_slice(batch):
        return jax.tree.map(lambda a: a[process_id * rows : (process_id + 1) * rows], batch)

    # The global batch assembled from per-process rows is the concatenation in process order.
    full = make_batches(1)[0]
    glob = sharding.make_global_batch(process_slice(full), mesh)
    np.testing.assert_array_equal(
        multihost_utils.process_allgather(glob["x"], tiled=True), full["x"]
    )

    state, losses, _ = train(mesh, num_steps, process_slice)
    ckpt = Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=2)
    ckpt.save(num_steps, state, data_state={"process": process_id, "position": num_steps})
    ckpt.wait_until_finished()
    mesh2 = sharding.make_mesh({"data": 2, "fsdp": 4})
    target = sharding.abstract_state(init_state, mesh2, min_size=MIN_SIZE)
    restored = ckpt.restore(abstract_state=target)
    ckpt.close()
    assert restored.step == num_steps
    assert restored.data_state == {"process": process_id, "position": num_steps}, (
        restored.data_state
    )
    params, params_restored = flat_params(state), flat_params(restored.state)
    for k in params:
        np.testing.assert_array_equal(params[k], params_restored[k], err_msg=k)
    if process_id == 0:
        np.savez(
            os.path.join(workdir, f"result_{num_processes}.npz"),
            losses=np.array(losses),
            **{f"param{k}": v for k, v in params.items()},
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
