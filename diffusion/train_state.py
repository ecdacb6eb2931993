"""The train state and what builds it: optimizer, initial state, EMA, and restoring EMA weights.

The state is a pytree {params, ema, opt, rest, step, rng}: `nnx.split(model, nnx.Param, ...)`
gives params (trained, fp32) and rest (RNG counters, buffers); ema is the exponential moving
average of params; opt the optax state. Checkpoints hold exactly this pytree, so evaluation
entry points restore through `restore_ema` and see the weights as training saved them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffusion import checkpoint, sharding


def make_optimizer(o, total_steps: int):
    """AdamW with linear warmup then cosine / constant decay, and global-norm clipping."""
    warm = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
    if o.get("decay", "cosine") == "cosine":
        rest = optax.cosine_decay_schedule(o.lr, max(total_steps - o.warmup_steps, 1), alpha=0.1)
    else:
        rest = optax.constant_schedule(o.lr)
    lr = optax.join_schedules([warm, rest], [o.warmup_steps])
    adamw = optax.adamw(lr, o.get("b1", 0.9), o.get("b2", 0.999), weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw), lr


def state_fns(task, tx, seed: int):
    """(graphdef, init_fn): init_fn() builds the full train state (jit-able, shardable)."""

    def init_fn():
        model = task.build_model(nnx.Rngs(seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {
            "params": params,
            "ema": jax.tree.map(jnp.copy, params),
            "opt": tx.init(params),
            "rest": rest,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    return graphdef, init_fn


def ema_update(ema, params, decay: float, step, warmup: bool = False):
    """ema <- d ema + (1 - d) params; with warmup d = min(decay, (1 + step) / (10 + step)), so
    early EMA weights do not average in the untrained start (step: the optimizer steps taken
    before this update)."""
    d = decay
    if warmup:
        step = jnp.asarray(step, jnp.float32)
        d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def restore_ema(cfg, task, workdir: str, step: int | None = None):
    """(model holding the EMA parameters of the run's checkpoint `step` (default: the latest),
    its step), on one device, for evaluation entry points."""
    tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
    graphdef, init_fn = state_fns(task, tx, cfg.seed)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    abstract = sharding.abstract_state(init_fn, mesh, min_size=cfg.get("fsdp_min_size", 2**16))
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        ckpt.check_compatible(abstract)  # another model config: name the mismatched parameter
        restored = ckpt.restore(step, abstract_state=abstract)
    state = restored.state
    return nnx.merge(graphdef, state["ema"], state["rest"]), restored.step
