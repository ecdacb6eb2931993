"""Reconstruction quality and latent statistics of an autoencoder run (configs/shapes_vae.py).

    python -m experiments.eval_autoencoder --workdir /tmp/shapes_vae [--split test]

Restores the EMA parameters of the run's latest checkpoint, encodes up to --num_images images of
the held-out split (posterior mode), decodes them, and reports mean L1, MSE and PSNR (images in
[-1, 1]: peak-to-peak 2, so PSNR = 10 log10(4 / MSE)), the mean KL(q || N(0, I)) per latent
element, and what a latent diffusion model trained on these latents needs: the per-channel mean
and std of the posterior mode and the scaling factor 1 / std over all latents (diffusers'
`scaling_factor`; 0.18215 for Stable Diffusion's VAE). Writes eval_autoencoder.json,
eval_autoencoder.png (rows of originals above their reconstructions) and a line in metrics.jsonl
to the workdir, and prints a table.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from diffusion import data, tasks
from diffusion import images as image_grids
from diffusion.train_state import restore_ema
from diffusion.workdir import Workdir, markdown_table, read_config


def load_images(name: str, split: str, num_images: int, data_dir=None) -> np.ndarray:
    """(N, H, W, C) float32 images in [-1, 1] (as in training), the first N of a split."""
    source = data.load_source(name, split, data_dir)
    n = min(num_images, len(source))
    return np.stack([data.preprocess_image(np.asarray(source[i]["image"])) for i in range(n)])


def reconstruct(model, images: np.ndarray, batch_size: int = 64):
    """(reconstructions, posterior modes, KL per example) over images, in batches."""

    graphdef, state = nnx.split(model)

    @jax.jit  # weights are an argument, not constants baked into the program
    def fn(state, x):
        m = nnx.merge(graphdef, state)
        posterior = m.encode(x)
        z = posterior.mode()
        return m.decode(z), z, posterior.kl()

    batches = (jnp.asarray(images[i : i + batch_size]) for i in range(0, len(images), batch_size))
    outs = [fn(state, x) for x in batches]
    return tuple(np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(3))


def latent_stats(z: np.ndarray) -> dict:
    """Per-channel mean / std of (N, h, w, c) latents and the scaling factor 1 / std(all)."""
    flat = z.reshape(-1, z.shape[-1]).astype(np.float64)  # (N h w, c)
    return {
        "latent_shape": list(z.shape[1:]),
        "latent_channel_mean": flat.mean(axis=0).tolist(),
        "latent_channel_std": flat.std(axis=0).tolist(),
        "latent_std": float(flat.std()),
        "scaling_factor": float(1.0 / flat.std()),
    }


def evaluate(workdir: str, split: str = "test", num_images: int = 1024, data_dir=None) -> dict:
    """Runs the evaluation described in the module docstring; returns the JSON record."""
    cfg = read_config(workdir)
    if cfg.task != "autoencoder":
        raise ValueError(f"{workdir} is not an autoencoder run (task={cfg.task!r})")
    images = load_images(cfg.data.name, split, num_images, data_dir or cfg.data.get("data_dir"))
    model, step = restore_ema(cfg, tasks.from_config(cfg), workdir)
    recon, z, kl = reconstruct(model, images)
    mse = float(np.mean((recon - images) ** 2))
    result = {
        "checkpoint_step": int(step),
        "dataset": cfg.data.name,
        "split": split,
        "num_images": len(images),
        "l1": float(np.mean(np.abs(recon - images))),
        "mse": mse,
        "psnr_db": float(10.0 * np.log10(4.0 / mse)),
        "kl_per_latent_element": float(np.mean(kl) / np.prod(z.shape[1:])),
        **latent_stats(z),
    }
    ncol = image_grids.GRID_COLUMNS
    n = min(len(images), 2 * ncol)
    grid = image_grids.paired_rows(jnp.asarray(images[:n]), jnp.asarray(recon[:n]), ncol)
    image_grids.save_grid(grid, os.path.join(workdir, "eval_autoencoder.png"), ncol)
    with open(os.path.join(workdir, "eval_autoencoder.json"), "w") as f:
        json.dump(result, f, indent=2)
    Workdir(workdir).log(event="eval_autoencoder", **result)
    return result


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the table
    f = flags.FLAGS
    r = evaluate(f.workdir, f.split, f.num_images, f.data_dir)
    keys = ["l1", "mse", "psnr_db", "kl_per_latent_element", "latent_std", "scaling_factor"]
    print(markdown_table([{"metric": k, "value": r[k]} for k in keys], ["metric", "value"]))
    print(
        f"step {r['checkpoint_step']}: {r['num_images']} {r['dataset']} {r['split']} images, "
        f"latents {r['latent_shape']}"
    )


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    flags.DEFINE_string("workdir", None, "an autoencoder training run's workdir")
    flags.DEFINE_string("split", "test", "dataset split to reconstruct")
    flags.DEFINE_integer("num_images", 1024, "images to evaluate (the first N of the split)")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the run's)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
