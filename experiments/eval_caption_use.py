"""How much a text-to-image run's denoiser uses its caption, noise level by noise level.

    python -m experiments.eval_caption_use --workdir /tmp/shapes_ldm_unet [--step N]
        [--num_examples 256] [--times 0.3,0.5,0.7,0.8,0.9,0.95]

For held-out (test split) examples x0 and fixed noise, the EMA denoiser's x0 estimate at time t
is scored (mean squared error to x0, in the model's data space: scaled latents or pixels) with
three conditions: the example's own caption, another example's caption (a shuffle), and the
empty prompt. `reliance` = error(shuffled) / error(own) says how much the denoiser acts on its
caption (1 = it ignores it); `gain` = error(empty) / error(own) how much the right caption
improves on none. Gain stays near 1 even for a model that follows its prompts, because by the
time x_t shows anything the caption could add (the background, the colours) x_t reveals it too,
and the error left is in details neither decides; reliance is the telling number. The first
shapes_ldm_unet run (eps prediction) had reliance 1.03-1.15 and gain below 1 at every t: it
barely read its captions (benchmarks/results/shapes_ldm_unet/eps); the v-prediction run's
reliance is 1.5-2.6 (benchmarks/results/shapes_ldm_unet).
Writes eval_caption_use.json and prints a table.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from diffusion import predictions, tasks
from diffusion.metrics import shapes_judge
from diffusion.train_state import restore_ema
from diffusion.workdir import markdown_table, read_config

TIMES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def _examples(task, cfg, n: int) -> dict:
    """The first n test examples of the run's data (its latent cache for a latent run), prepared
    as a training batch."""
    name, data_dir = task.dataset(cfg.data)
    records = shapes_judge.real_examples(name, "test", data_dir, limit=n)
    batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
    return task.prepare_batch(batch)


def caption_use(workdir: str, step: int | None = None, num_examples: int = 256,
                times=TIMES, seed: int = 0) -> dict:  # fmt: skip
    """{"rows": [{t, own, shuffled, empty, reliance, gain}], ...}; x0 errors of the EMA model."""
    cfg = read_config(workdir)
    task = tasks.from_config(cfg)
    if not hasattr(task.conditioning, "tokenizer"):
        raise ValueError(f"{workdir} is not a text-conditioned run ({cfg.conditioning.name!r})")
    model, step = restore_ema(cfg, task, workdir, step)
    batch = _examples(task, cfg, num_examples)
    x0 = jnp.asarray(batch.pop("x"))
    own = {k: jnp.asarray(v) for k, v in batch.items()}
    n = x0.shape[0]
    shuffled = jax.tree.map(lambda c: c[np.roll(np.arange(n), 1)], own)
    empty = jax.tree.map(lambda e: jnp.broadcast_to(e, (n, *e.shape)), task.conditioning.null())
    s, ptype = task.schedule, task.objective.prediction_type
    eps = jax.random.normal(jax.random.key(seed), x0.shape, x0.dtype)

    @jax.jit
    def x0_error(cond, t):
        tb = jnp.full((n,) + (1,) * (x0.ndim - 1), t)
        x_t = s.alpha(tb) * x0 + s.sigma(tb) * eps
        pred = task.model_fn(model, x_t, s.model_time(jnp.full((n,), t)), cond)
        return jnp.mean((predictions.to_x0(pred, x_t, tb, s, ptype) - x0) ** 2)

    rows = []
    for t in times:
        t = jnp.float32(t)
        e = {k: float(x0_error(c, t)) for k, c in (("own", own), ("shuffled", shuffled),
                                                    ("empty", empty))}  # fmt: skip
        rows.append({"t": float(t), **e, "reliance": e["shuffled"] / e["own"],
                     "gain": e["empty"] / e["own"]})  # fmt: skip
    out = {"checkpoint_step": int(step), "prediction_type": ptype, "num_examples": n,
           "data_variance": float(jnp.var(x0)), "rows": rows}  # fmt: skip
    with open(os.path.join(workdir, "eval_caption_use.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    times = tuple(float(t) for t in f.times.split(","))
    r = caption_use(f.workdir, f.step, f.num_examples, times)
    print(markdown_table(r["rows"], ["t", "own", "shuffled", "empty", "reliance", "gain"]))
    print(f"step {r['checkpoint_step']} ({r['prediction_type']} prediction): x0 squared error per "
          f"element with the own / a shuffled / the empty caption; data variance "
          f"{r['data_variance']:.3f}")  # fmt: skip


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "a text-conditioned training run's workdir")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_integer("num_examples", 256, "test examples")
    flags.DEFINE_string("times", ",".join(map(str, TIMES)), "comma-separated times in (0, 1]")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
