"""The tiny latent text-to-image run several test files build on: a VAE trained 4 steps and the
SD1-style latent U-Net (configs/shapes_ldm_unet.py:runlocal) trained 12 steps on its latents.

Trained once per pytest run: under xdist the workers share the run's base temp directory and
take a file lock, so whichever worker gets there first trains and the others read the result.
"""

import json

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
