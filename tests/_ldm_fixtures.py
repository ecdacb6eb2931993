"""The tiny latent text-to-image run several test files build on: a VAE trained 4 steps and the
SD1-style latent U-Net (configs/shapes_ldm_unet.py:runlocal) trained 12 steps on its latents.

Trained once per pytest run: under xdist the workers share the run's base temp directory and
take a file lock, so whichever worker gets there first trains and the others read the result.
"""

import json

import numpy as np
from filelock import FileLock

from configs import shapes_ldm_unet, shapes_vae
from diffusion import train

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1, "num_devices": 1}


def short(cfg, data_dir, steps):
    cfg.data.data_dir = str(data_dir)
    cfg.total_steps, cfg.ckpt_every, cfg.log_every = steps, steps // 2, 2
    cfg.sample.every = steps
    cfg.mesh = ONE_DEVICE
    return cfg


def tiny_ldm_runs(tmp_path_factory, worker_id: str):
    """(vae workdir, ldm workdir, data_dir, summary of the LDM run without its state)."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: .../pytest-N/popen-gwK -> .../pytest-N
        shared = shared.parent
    root = shared / "tiny_ldm"
    with FileLock(str(shared / "tiny_ldm.lock")):
        done = root / "summary.json"
        if not done.exists():
            data_dir = root / "tfds"
            vae_cfg = short(shapes_vae.get_config("runlocal"), data_dir, 4)
            vae_cfg.sample.every = 0
            train.train(vae_cfg, str(root / "vae"))
            cfg = short(shapes_ldm_unet.get_config("runlocal"), data_dir, 12)
            cfg.latents.vae = str(root / "vae")
            summary = train.train(cfg, str(root / "ldm"))
            done.write_text(json.dumps({k: v for k, v in summary.items() if k != "state"}))
        summary = json.loads(done.read_text())
    return root / "vae", root / "ldm", root / "tfds", summary


FINETUNE_STEPS = 3


def finetune_run(cfg, section, tiny_ldm, workdir):
    """Train a fine-tuning config (section: the config entry naming the base) on the tiny LDM run,
    shortened to FINETUNE_STEPS steps on one device without a sample grid."""
    _, ldm_dir, data_dir, _ = tiny_ldm
    cfg[section].base = str(ldm_dir)
    cfg.data.data_dir = str(data_dir)
    cfg.mesh = ONE_DEVICE
    cfg.total_steps, cfg.ckpt_every, cfg.log_every = FINETUNE_STEPS, FINETUNE_STEPS, 1
    cfg.sample.every = 0  # a sampling program per run would double the compile time
    return train.train(cfg, str(workdir))


def flat_params(model, filt=None) -> dict:
    """{path: array} of the model's parameters (or of the variables `filt` selects)."""
    from flax import nnx

    state = nnx.state(model, filt or nnx.Param)
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def jit_call(fn, model):
    """fn(model) as one compiled program (eager U-Net calls compile op by op: far slower)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda st: fn(nnx.merge(graphdef, st)))(state)


def ours_images(workdir, prompts, x_T, **sample_kw):
    """Our images in [0, 1] for prompts from initial latents x_T (NHWC), the run's EMA weights."""
    import jax
    import jax.numpy as jnp

    from diffusion import tasks
    from diffusion.train_state import restore_ema
    from diffusion.workdir import read_config

    cfg = read_config(str(workdir))
    task = tasks.from_config(cfg)
    model, _ = restore_ema(cfg, task, str(workdir))
    cond = {"input_ids": jnp.asarray(task.conditioning.tokenizer(prompts))}
    z = task.sample(model, jax.random.key(0), cond, x_T.shape, x_T=jnp.asarray(x_T), **sample_kw)
    return np.clip((np.asarray(task.to_pixels(z)) + 1.0) / 2.0, 0.0, 1.0)
