"""The training loop, read top to bottom: mesh, data, model and optimizer, shardings, step,
resume, sampling, loop.

    summary = train(config, workdir)

What is trained comes from `tasks.from_config` (a diffusion model or an autoencoder with its
conditioning); the train state is the pytree of train_state.py. The step is a pure function under
`jax.jit` with explicit in/out shardings and donation. RNG per step is fold_in(key, step) and the
data iterator's position is checkpointed with the state, so a killed run resumes bit-identically.
A non-finite loss stops the run naming the step; the last good checkpoint stays. Writes
config.json, metrics.jsonl, TensorBoard events (tb/), samples_*.png, report.md and checkpoints/.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from diffusion import checkpoint, data, images, sharding, tasks
from diffusion.train_state import (
    ema_update,
    from_pretrained,
    frozen_weights,
    init_weights,
    make_optimizer,
    state_fns,
)
from diffusion.workdir import Workdir

CONFIG_KEYS = {
    "name", "task", "seed", "data", "conditioning", "model", "compute_dtype", "schedule",
    "objective", "optim", "ema_decay", "ema_warmup", "total_steps", "log_every", "ckpt_every",
    "keep_checkpoints", "sample", "mesh", "fsdp_min_size", "sharding_rules", "kl_weight",
    "latents", "finetune", "controlnet", "init_from",
}  # fmt: skip


class NonFiniteLossError(RuntimeError):
    pass


def check_config_keys(cfg) -> None:
    """Reject unknown top-level keys (typos would otherwise be silently ignored)."""
    unknown = sorted(set(cfg.keys()) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid: {sorted(CONFIG_KEYS)}")


def train(cfg, workdir: str) -> dict:
    """Train (or resume) the run described by cfg in workdir; returns a summary dict."""
    check_config_keys(cfg)
    task = tasks.from_config(cfg)
    wd = Workdir(workdir, cfg)

    # ---- mesh: ("data", "fsdp", "tensor"); num_devices takes the first n devices
    mesh_shape = dict(cfg.mesh)
    n = mesh_shape.pop("num_devices", None)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n] if n else None)
    rules = tuple(map(tuple, cfg.get("sharding_rules", sharding.DEFAULT_RULES)))
    with sharding.mesh_context(mesh, rules):
        # ---- data: this process's shard of the global batch
        nproc = jax.process_count()
        if cfg.data.batch_size % nproc:
            raise ValueError(f"batch_size {cfg.data.batch_size} not divisible by {nproc} processes")
        source = task.dataset(cfg.data)  # (name, data_dir): a latent cache for latent models
        it = iter(_pipeline(source, cfg.data.batch_size // nproc, cfg.seed))

        # ---- model and optimizer: the train state's structure, nothing allocated yet
        tx, lr = make_optimizer(cfg.optim, cfg.total_steps)
        graphdef, init_fn = state_fns(task, tx, cfg.seed)

        # ---- shardings: FSDP-by-size plus the logical-axis rules; frozen (pretrained) weights
        # of fine-tuning tasks sit beside the state, outside checkpoints (train_state.py)
        min_size = cfg.get("fsdp_min_size", 2**16)
        abstract = sharding.abstract_state(init_fn, mesh, min_size=min_size)
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        frozen = frozen_weights(task, cfg.seed, mesh, min_size)
        frozen_shardings = jax.tree.map(lambda a: a.sharding, frozen)
        counts = {"trained_params": _size(abstract["params"]), "frozen_params": _size(frozen)}

        # ---- step
        jitted = jax.jit(
            make_train_step(task, graphdef, tx, lr, cfg),
            in_shardings=(shardings, frozen_shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        step_fn = lambda state, batch: jitted(state, frozen, batch)

        # ---- resume from the latest readable checkpoint, or initialise sharded
        ckpt = checkpoint.Checkpointer(wd.file("checkpoints"), max_to_keep=cfg.keep_checkpoints)
        if ckpt.latest_step() is not None:
            ckpt.check_compatible(abstract)
            restored = ckpt.restore(abstract_state=abstract, quarantine_bad=True)
            state, start = restored.state, restored.step
            if restored.data_state is not None:
                it.set_state(restored.data_state)
            print(f"resumed from step {start} in {ckpt.directory}")
        else:
            state, start = sharding.shard_init(init_fn, mesh, shardings), 0
            state = from_pretrained(task, state)
            if cfg.get("init_from"):  # warm start: continued training of a trained model
                state = from_pretrained(task, state, init_weights(task, cfg.init_from))
                print(f"initialised from {cfg.init_from}")

        # ---- sampling: the task's grid from the EMA weights, one compiled program
        example = task.prepare_batch(next(iter(_pipeline(source, task.sampling.num_images, 0))))
        grid_fn = jax.jit(
            lambda ema, frozen, rest, rng: task.sample_grid(
                nnx.merge(graphdef, ema, frozen, rest), rng, example
            )
        )
        sample_fn = lambda ema, rest, rng: grid_fn(ema, frozen, rest, rng)

        # ---- loop
        next_batch = lambda: sharding.make_global_batch(task.prepare_batch(next(it)), mesh)
        summary = _loop(cfg, wd, task, ckpt, step_fn, sample_fn, next_batch, it, state, start)
    summary |= counts
    write_report(wd, cfg, summary)
    return summary


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _pipeline(source, batch_size, seed):
    name, data_dir = source
    return data.make_pipeline(name, "train", batch_size=batch_size, seed=seed, data_dir=data_dir)


def make_train_step(task, graphdef, tx, lr, cfg):
    """train_step(state, frozen, batch) -> (state, metrics): loss and gradients of the trained
    parameters (accumulated over cfg.optim.grad_accum microbatches), AdamW update, EMA update;
    `frozen` holds the parameters the task does not train (empty for ordinary runs)."""
    accum = cfg.optim.get("grad_accum", 1)
    decay, warmup = cfg.ema_decay, cfg.get("ema_warmup", False)

    def loss_fn(params, frozen, rest, batch, rng):
        return task.loss(nnx.merge(graphdef, params, frozen, rest), batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(params, frozen, rest, batch, rng):  # mean over (accum, B / accum, ...)
        micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

        def body(carry, xs):
            i, mb = xs
            (l, a), g = grad_fn(params, frozen, rest, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (l, a, g)), None

        mb0 = jax.tree.map(lambda x: x[0], micro)
        first = jax.eval_shape(grad_fn, params, frozen, rest, mb0, rng)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), (first[0][0], first[0][1], first[1])
        )
        (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
        return (loss, aux), grads

    def train_step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params, rest = state["params"], state["rest"]
        grads_of = grad_fn if accum == 1 else accumulated
        (loss, aux), grads = grads_of(params, frozen, rest, batch, rng)
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        ema = ema_update(state["ema"], params, decay, state["step"], warmup)
        new = {**state, "params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),  # non-finite => never checkpointed
            "lr": lr(state["step"]),
        }
        return new, {**metrics, **aux}

    return train_step


def _loop(cfg, wd, task, ckpt, step_fn, sample_fn, next_batch, it, state, start) -> dict:
    """Steps start..total_steps: log, checkpoint (with the data position) and sample grids."""
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(wd.file("tb"))
    t0, losses_seen, every = time.perf_counter(), [], task.sampling.every
    steps = range(start, cfg.total_steps)
    batch = next_batch() if steps else None
    try:
        for step in tqdm(steps, initial=start, total=cfg.total_steps, desc="train",
                         disable=jax.process_index() != 0):  # fmt: skip
            state, metrics = step_fn(state, batch)  # dispatched asynchronously
            data_state = it.get_state()  # the iterator after this step's batch
            if step + 1 < cfg.total_steps:  # read the next batch while this step computes
                batch = next_batch()
            loss, pnorm = float(metrics["loss"]), float(metrics["param_norm"])
            if not (np.isfinite(loss) and np.isfinite(pnorm)):
                raise NonFiniteLossError(
                    f"non-finite loss {loss} (parameter norm {pnorm}) at step {step + 1}; "
                    f"stopping. The last good "
                    f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}"
                )
            losses_seen.append(loss)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.total_steps:
                m = {k: float(v) for k, v in metrics.items()}
                m["steps_per_s"] = (done - start) / (time.perf_counter() - t0)
                wd.log(step=done, **m)
                for k, v in m.items() if writer else ():
                    writer.add_scalar(f"train/{k}", v, done)
            if done % cfg.ckpt_every == 0 or done == cfg.total_steps:
                ckpt.save(done, state, data_state=data_state, metrics={"loss": loss})
            if every > 0 and (done % every == 0 or done == cfg.total_steps):
                grid = sample_fn(state["ema"], state["rest"], jax.random.key(done))
                if jax.process_index() == 0:
                    path = wd.file(f"samples_{done:06d}.png")
                    images.save_grid(task.to_pixels(grid), path, task.grid_columns)
        ckpt.wait_until_finished()
        saved = ckpt.all_steps()
    finally:  # let an async save finish (or fail loudly) before leaving
        ckpt.wait_until_finished()
        ckpt.close()
        if writer:
            writer.close()
    final = float(np.mean(losses_seen[-10:])) if losses_seen else None
    return {
        "final_loss": final,
        "steps": cfg.total_steps,
        "start_step": start,
        "state": state,
        "checkpoints": saved,
    }


def write_report(wd: Workdir, cfg, s: dict) -> None:
    lines = [
        f"# Training report: {cfg.get('name', cfg.task)}",
        "",
        f"steps {s['start_step']} -> {s['steps']}; final loss (mean of last 10): {s['final_loss']}",
        f"checkpoints: {s['checkpoints']}",
        f"parameters: {s['trained_params']} trained, {s['frozen_params']} frozen (not in "
        "checkpoints)",
        f"samples: samples_{s['steps']:06d}.png ({cfg.sample.method}, "
        f"{cfg.sample.num_steps} steps)",
    ]
    wd.write_report("\n".join(lines) + "\n")
