"""The training loop, read top to bottom: mesh, data, model, shardings, step, resume, evals, loop.

    summary = train(config, workdir)

The train state is a pytree {params, ema, opt, rest, step, rng} from `nnx.split`; the step is a
pure function under `jax.jit` with explicit in/out shardings and donation. RNG per step is
fold_in(key, step) and the data iterator's position is checkpointed with the state, so a killed
run resumes bit-identically. A non-finite loss stops the run naming the step; the last good
checkpoint stays. Writes config.json, metrics.jsonl, TensorBoard events (tb/), samples_*.png,
report.md and checkpoints/ to the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from PIL import Image
from tqdm import tqdm

from diffusion import checkpoint, data, sharding, tasks
from diffusion.workdir import Workdir


class NonFiniteLossError(RuntimeError):
    pass


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


def state_fns(cfg, tx):
    """(graphdef, init_fn): init_fn() builds the full train state (jit-able, shardable)."""

    def init_fn():
        model = tasks.build_model(cfg, rngs=nnx.Rngs(cfg.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {
            "params": params,
            "ema": jax.tree.map(jnp.copy, params),
            "opt": tx.init(params),
            "rest": rest,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(cfg.seed + 1)),
        }

    abstract = nnx.eval_shape(lambda: tasks.build_model(cfg, rngs=nnx.Rngs(cfg.seed)))
    graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    return graphdef, init_fn


def make_train_step(cfg, task, graphdef, tx, lr):
    accum = cfg.optim.get("grad_accum", 1)

    def loss_fn(params, rest, batch, rng):
        return task.loss(nnx.merge(graphdef, params, rest), batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params, rest = state["params"], state["rest"]
        if accum == 1:
            (loss, aux), grads = grad_fn(params, rest, batch, rng)
        else:  # gradient accumulation over microbatches, (accum, B / accum, ...)
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                (l, a), g = grad_fn(params, rest, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            first = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), (first[0][0], first[0][1], first[1])
            )
            (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
        new = {**state, "params": params, "ema": ema, "opt": opt, "step": state["step"] + 1}
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),  # non-finite => never checkpointed
            "lr": lr(state["step"]),
        }
        return new, {**metrics, **aux}

    return train_step


def _shapes_by_path(tree) -> dict[str, tuple]:
    """{'params/down_blocks/0/...': shape}, ignoring NNX's `.value` wrapper in key paths."""

    def name(k):
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        keys = [name(k) for k in path if name(k) != "value"]
        out["/".join(keys)] = tuple(x.shape)
    return out


def check_compatible(ckpt: checkpoint.Checkpointer, abstract) -> None:
    """Fail naming the first mismatched parameter if the newest readable checkpoint is from
    another model config (corrupt or partial steps are left to the restore fallback)."""
    for step in reversed(ckpt.all_steps()):
        if ckpt.missing_parts(step):
            continue
        try:
            meta = ocp.StandardCheckpointer().metadata(ckpt.step_dir(step) / "state")
        except Exception:  # unreadable: Checkpointer.restore reports it and falls back
            continue
        meta = meta.item_metadata
        have = _shapes_by_path(meta.tree if hasattr(meta, "tree") else meta)
        want = _shapes_by_path(abstract)
        # params/ first: they name the module a person will recognise (ema/ and opt/ mirror them)
        for key in sorted(set(want) | set(have), key=lambda k: (not k.startswith("params/"), k)):
            if want.get(key) != have.get(key):
                raise ValueError(
                    f"checkpoint step {step} in {ckpt.directory} does not match this model "
                    f"config: parameter {key} has shape {have.get(key, 'missing')} in the "
                    f"checkpoint, {want.get(key, 'missing')} in the model"
                )
        return


def save_grid(images, path, ncol=8, pad=2):
    """(N, H, W, C) images in [-1, 1] -> a PNG grid, row-major, ncol per row; each image upscaled
    (nearest) to at least 32 px and separated by pad grey pixels."""
    x = np.asarray(jnp.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)
    scale = max(2, 32 // x.shape[2])
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = x.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, np.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[top : top + h, left : left + w] = x[i]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def make_sampler(cfg, task, graphdef, example):
    """jit(params, rest, rng) -> images, with the config's sampler and conditions."""
    sc, n = cfg.sample, cfg.sample.num_images
    cond = None
    if cfg.get("conditioning") == "class":
        cond = {"label": jnp.arange(n, dtype=jnp.int32) % cfg.num_classes}
    elif cfg.get("conditioning") == "text":
        cond = {"tokens": jnp.asarray(task.tokenize(list(sc.captions) * n)[:n])}
    elif cfg.task == "autoencoder":
        cond = {"x": jnp.asarray(example["x"][:n])}
    shape = (n, *example["x"].shape[1:])

    @jax.jit
    def fn(params, rest, rng):
        model = nnx.merge(graphdef, params, rest)
        out = task.sample(
            model,
            rng,
            cond,
            shape,
            method=sc.method,
            num_steps=sc.num_steps,
            guidance_scale=sc.get("guidance_scale", 1.0),
        )
        if cfg.task == "autoencoder":  # a grid row of originals above their reconstructions
            return paired_rows(cond["x"], out.astype(cond["x"].dtype), GRID_COLUMNS)
        return out

    return fn


GRID_COLUMNS = 8  # sample grids without class columns


def paired_rows(originals: jax.Array, recons: jax.Array, ncol: int) -> jax.Array:
    """(N, H, W, C) x 2 -> (2 * ceil(N / ncol) * ncol, H, W, C): each row of ncol originals is
    followed by the row of their reconstructions; a short last row is padded with grey (0)."""
    n = originals.shape[0]
    pad = [(0, -n % ncol)] + [(0, 0)] * (originals.ndim - 1)
    o, r = jnp.pad(originals, pad), jnp.pad(recons, pad)
    rows = lambda a: a.reshape(-1, ncol, *a.shape[1:])  # (R, ncol, H, W, C)
    return jnp.stack([rows(o), rows(r)], axis=1).reshape(-1, *o.shape[1:])  # (2 R ncol, H, W, C)


CONFIG_KEYS = {
    "name", "task", "seed", "data", "conditioning", "num_classes", "model", "text_encoder",
    "tokenizer", "compute_dtype", "schedule", "objective", "optim", "ema_decay", "total_steps",
    "log_every", "ckpt_every", "keep_checkpoints", "sample", "mesh", "fsdp_min_size",
    "sharding_rules", "kl_weight",
}  # fmt: skip


def check_config_keys(cfg) -> None:
    """Reject unknown top-level keys (typos would otherwise be silently ignored)."""
    unknown = sorted(set(cfg.keys()) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid: {sorted(CONFIG_KEYS)}")


def train(cfg, workdir: str) -> dict:
    """Train (or resume) the run described by cfg in workdir; returns a summary dict."""
    check_config_keys(cfg)
    wd = Workdir(workdir, cfg)
    task = tasks.Task.from_config(cfg)
    mesh_shape = dict(cfg.mesh)
    n = mesh_shape.pop("num_devices", None)  # use the first n devices (e.g. 1 for a reference)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n] if n else None)
    rules = tuple(map(tuple, cfg.get("sharding_rules", sharding.DEFAULT_RULES)))
    with sharding.mesh_context(mesh, rules):
        run = _setup(cfg, wd, task, mesh)
        summary = _loop(cfg, wd, task, mesh, run)
    write_report(wd, cfg, summary)
    return summary


def _pipeline(cfg, batch_size, seed):
    return data.make_pipeline(
        cfg.data.name,
        "train",
        batch_size=batch_size,
        seed=seed,
        data_dir=cfg.data.get("data_dir") or None,
    )


def _setup(cfg, wd, task, mesh) -> dict:
    """Data iterator, jitted step and sampler, and the (restored or fresh) train state."""
    nproc = jax.process_count()
    if cfg.data.batch_size % nproc:
        raise ValueError(f"batch_size {cfg.data.batch_size} not divisible by {nproc} processes")
    it = iter(_pipeline(cfg, cfg.data.batch_size // nproc, cfg.seed))
    tx, lr = make_optimizer(cfg.optim, cfg.total_steps)
    graphdef, init_fn = state_fns(cfg, tx)
    abstract = sharding.abstract_state(init_fn, mesh, min_size=cfg.get("fsdp_min_size", 2**16))
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    step_fn = jax.jit(
        make_train_step(cfg, task, graphdef, tx, lr),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    ckpt = checkpoint.Checkpointer(wd.file("checkpoints"), max_to_keep=cfg.keep_checkpoints)
    if ckpt.latest_step() is not None:
        check_compatible(ckpt, abstract)
        restored = ckpt.restore(abstract_state=abstract, quarantine_bad=True)
        state, start = restored.state, restored.step
        if restored.data_state is not None:
            it.set_state(restored.data_state)
        print(f"resumed from step {start} in {ckpt.directory}")
    else:
        state, start = sharding.shard_init(init_fn, mesh, shardings), 0
    example = task.prepare_batch(next(iter(_pipeline(cfg, cfg.sample.num_images, 0))))
    sample_fn = make_sampler(cfg, task, graphdef, example)
    return dict(it=it, step_fn=step_fn, ckpt=ckpt, state=state, start=start, sample_fn=sample_fn)


def _loop(cfg, wd, task, mesh, run) -> dict:
    it, ckpt, state, start = run["it"], run["ckpt"], run["state"], run["start"]
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(wd.file("tb"))
    t0, losses_seen = time.perf_counter(), []
    steps = range(start, cfg.total_steps)
    next_batch = lambda: sharding.make_global_batch(task.prepare_batch(next(it)), mesh)
    batch = next_batch() if steps else None
    try:
        for step in tqdm(
            steps,
            initial=start,
            total=cfg.total_steps,
            desc="train",
            disable=jax.process_index() != 0,
        ):
            state, metrics = run["step_fn"](state, batch)  # dispatched asynchronously
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
            if cfg.sample.every > 0 and (done % cfg.sample.every == 0 or done == cfg.total_steps):
                images = run["sample_fn"](state["ema"], state["rest"], jax.random.key(done))
                if jax.process_index() == 0:
                    ncol = cfg.num_classes if cfg.get("conditioning") == "class" else GRID_COLUMNS
                    save_grid(images, wd.file(f"samples_{done:06d}.png"), ncol)  # column = class
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
        f"samples: samples_{s['steps']:06d}.png ({cfg.sample.method}, "
        f"{cfg.sample.num_steps} steps)",
    ]
    wd.write_report("\n".join(lines) + "\n")


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote to its workdir's config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: not a workdir of a training run")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_ema(cfg, workdir: str):
    """(model with the EMA parameters of the run's latest checkpoint, its step), on one device,
    for evaluation entry points."""
    tx, _ = make_optimizer(cfg.optim, cfg.total_steps)
    graphdef, init_fn = state_fns(cfg, tx)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    abstract = sharding.abstract_state(init_fn, mesh, min_size=cfg.get("fsdp_min_size", 2**16))
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        restored = ckpt.restore(abstract_state=abstract)
    state = restored.state
    return nnx.merge(graphdef, state["ema"], state["rest"]), restored.step
