"""How far deterministic samplers land from a long DDIM run on a trained class-conditional
model, from the same x_T: which one is converged enough to be a reference solution.

    python -m tools.reference_convergence --workdir /work/runs/reproduce/models/digits_eps-...

Draws one sample per class (10) with each `method[:option=value]@steps` (parsed as the sweep's
`reference`) and prints the RMS distance of each to
DDIM at `--ref_steps` (default 1000, every training step of a 1000-step DDPM table).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from diffusion import tasks
from diffusion.train_state import restore_ema
from diffusion.workdir import markdown_table, read_config
from experiments import sweep_samplers

SETTINGS = "ddim@200,dpmpp_2m@100,dpmpp_2m@200,rk4@50,rk4@100,heun@100"


def distances(workdir: str, settings: str = SETTINGS, ref_steps: int = 1000) -> list[dict]:
    cfg = read_config(workdir)
    task = tasks.from_config(cfg)
    model, _ = restore_ema(cfg, task, workdir)
    m = cfg.model.config
    cond = {"class_labels": jnp.arange(10, dtype=jnp.int32)}
    shape = (10, m.sample_size, m.sample_size, m.in_channels)
    draw = lambda method, n, **kw: np.asarray(
        task.sample(model, jax.random.key(0), cond, shape, method=method, num_steps=n, **kw)
    )
    ref = draw("ddim", ref_steps)
    rows = []
    for spec in settings.split(","):
        s = sweep_samplers.parse_reference(spec)  # checks the method is deterministic
        x = draw(s.method, s.num_steps, **dict(s.options))
        rows.append({"setting": spec, "rms_to_ddim": float(np.sqrt(np.mean((x - ref) ** 2)))})
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    rows = distances(f.workdir, f.settings, f.ref_steps)
    print(markdown_table(rows, ["setting", "rms_to_ddim"], ".3g"))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "a class-conditional digits training run")
    flags.DEFINE_string("settings", SETTINGS, "comma-separated method@steps")
    flags.DEFINE_integer("ref_steps", 1000, "DDIM steps of the reference")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
