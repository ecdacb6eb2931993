"""The train state and what builds it: optimizer, initial state, EMA, and restoring EMA weights.

The state is a pytree {params, ema, opt, rest, step, rng}:
`nnx.split(model, trainable, nnx.Param, ...)` gives params (trained, fp32), the frozen
parameters and rest (RNG counters, buffers); ema is the exponential moving average of params;
opt the optax state. `trainable` is the task's filter (`task.trainable`, default nnx.Param:
everything). Fine-tuning tasks (diffusion/adapters/) train a subset, e.g. LoRA adapters
(`adapters.LoRAParam`) or a ControlNet, and name pretrained weights (`task.pretrained()`,
{path: array}): trained parameters start from them, and the frozen ones are loaded from them
by `frozen_weights` and passed to the train step beside the state, never checkpointed (the
optimizer and checkpoints hold only what is trained). For ordinary runs the frozen part is
empty and the state is what it always was. Checkpoints hold exactly the state pytree, so
evaluation entry points restore through `restore_ema` and see the weights as training saved
them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
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


def trainable(task):
    """The task's filter of trained parameters (default: every nnx.Param)."""
    return getattr(task, "trainable", nnx.Param)


def state_fns(task, tx, seed: int):
    """(graphdef, init_fn): init_fn() builds the full train state (jit-able, shardable)."""

    def init_fn():
        model = task.build_model(nnx.Rngs(seed))
        _, params, _, rest = nnx.split(model, trainable(task), nnx.Param, ...)
        return {
            "params": params,
            "ema": jax.tree.map(jnp.copy, params),
            "opt": tx.init(params),
            "rest": rest,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    graphdef = nnx.split(abstract, trainable(task), nnx.Param, ...)[0]
    return graphdef, init_fn


def _pretrained(task) -> dict:
    return task.pretrained() if hasattr(task, "pretrained") else {}


def frozen_weights(task, seed: int, mesh, min_size: int = sharding.DEFAULT_MIN_SIZE):
    """The parameters the task does not train, from its pretrained weights, placed on the mesh
    (FSDP-by-size like the state); an empty State for ordinary runs."""
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed)))
    frozen = nnx.split(abstract, trainable(task), nnx.Param, ...)[2]
    flat = nnx.to_flat_state(frozen)
    if not len(flat):
        return frozen
    weights = _pretrained(task)
    missing = [".".join(map(str, p)) for p, _ in flat if p not in weights]
    if missing:
        raise ValueError(f"frozen parameters without pretrained weights: {missing[:8]}")
    values = []
    for path, var in flat:
        value = np.asarray(weights[path], var.get_value().dtype)
        if value.shape != var.get_value().shape:
            raise ValueError(f"pretrained {'.'.join(map(str, path))} has shape {value.shape}, "
                             f"the model {var.get_value().shape}")  # fmt: skip
        values.append((path, var.replace(value)))
    shardings = sharding.param_shardings(frozen, mesh, min_size=min_size)
    return jax.device_put(nnx.from_flat_state(values), shardings)


def from_pretrained(task, state: dict, weights: dict | None = None) -> dict:
    """A fresh state whose trained parameters (and their EMA) start from the task's pretrained
    weights where it has them (full fine-tuning, a ControlNet copied from its U-Net), or from
    `weights` ({path: array}, a warm start: init_weights)."""
    weights = _pretrained(task) if weights is None else weights
    if not weights:
        return state

    def fill(tree):
        out = []
        for path, var in nnx.to_flat_state(tree):
            if path in weights:
                old = var.get_value()
                new = np.asarray(weights[path], old.dtype)
                if new.shape != old.shape:
                    raise ValueError(f"pretrained {'.'.join(map(str, path))} has shape "
                                     f"{new.shape}, the model {old.shape}")  # fmt: skip
                var = var.replace(jax.device_put(new, old.sharding))
            out.append((path, var))
        return nnx.from_flat_state(out)

    return {**state, "params": fill(state["params"]), "ema": fill(state["ema"])}


def init_weights(task, path: str) -> dict:
    """{path: array} to warm-start every parameter of `task`'s model from a text-to-image
    workdir (its latest EMA weights) or pipeline folder (config key `init_from`): continued
    training with a fresh optimizer and schedule. The two models must have the same parameters
    (names and shapes; from_pretrained checks shapes)."""
    from diffusion.adapters import base  # adapters build on this module

    weights = base.flat_params(base.load_base(path)[1])
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    ours = {p for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    missing, extra = sorted(ours - set(weights)), sorted(set(weights) - ours)
    if missing or extra:
        name = lambda ps: [".".join(map(str, p)) for p in ps[:6]]
        raise ValueError(
            f"init_from={path}: its model is not this config's (parameters only here: "
            f"{name(missing)}; only there: {name(extra)})"
        )
    return weights


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
    frozen = frozen_weights(task, cfg.seed, mesh, cfg.get("fsdp_min_size", 2**16))
    return nnx.merge(graphdef, state["ema"], frozen, state["rest"]), restored.step
