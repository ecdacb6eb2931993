"""Export a latent text-to-image training run as a diffusers pipeline folder.

    python -m tools.export_pipeline --workdir /tmp/shapes_ldm_unet --out /tmp/shapes_sd \\
        [--step N] [--dtype float16]

Writes model_index.json, unet/ (StableDiffusionPipeline, for a UNet2DConditionModel run) or
transformer/ (StableDiffusion3Pipeline, for an SD3Transformer2DModel run with SD3's two-CLIP
prompt layout and no T5), vae/ (the frozen VAE with the run's latent scaling_factor),
text_encoder[_2]/, tokenizer[_2]/ (the run's CLIP BPE tokenizer with model_max_length = the run's
token length), scheduler/ (the scheduler of the run's sampler and grid). diffusers loads it with
`<Pipeline>.from_pretrained(out)` offline (SD3: `text_encoder_3=None, tokenizer_3=None` as for
any SD3 folder without T5; sample with `max_sequence_length=0`, the run's zero T5 tokens). EMA
weights of the latest checkpoint (or --step). The folder is written beside `out` and renamed into
place, so nothing is left half-written; `out` must not exist or be empty. `--dtype float16`
stores the weights as fp16 (half the size; loaders cast them back to their parameter type).

A VAE run (configs/shapes_vae.py) exports as a diffusers AutoencoderKL folder with its measured
latent scaling_factor; latent configs take it as `--config.latents.vae=FOLDER`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from diffusion import latent, models, tasks
from diffusion.data import tokenizer as tokenizers
from diffusion.train_state import restore_ema
from diffusion.workdir import check_new_folder, read_config, write_new_folder

PIPELINES = {"UNet2DConditionModel": "StableDiffusionPipeline",
             "SD3Transformer2DModel": "StableDiffusion3Pipeline"}  # fmt: skip


def scheduler_config(task) -> dict:
    """The diffusers scheduler that samples as the run's `sample` settings do."""
    s, sc = task.schedule, task.sampling
    ptype = {"eps": "epsilon", "v": "v_prediction", "velocity": "flow"}.get(
        task.objective.prediction_type, task.objective.prediction_type
    )
    if s.family == "flow":
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": s.shift,
                "num_train_timesteps": s.num_train_timesteps}  # fmt: skip
    table = {"beta_schedule": s.beta_schedule, "num_train_timesteps": s.num_train_timesteps,
             "prediction_type": ptype, "timestep_spacing": sc.grid or "linspace",
             "steps_offset": 1}  # fmt: skip
    defaults = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 0.02)}
    if s.beta_schedule in defaults:
        start, end = defaults[s.beta_schedule]
        table |= {"beta_start": s.beta_start or start, "beta_end": s.beta_end or end}
    if s.zero_terminal_snr:
        table["rescale_betas_zero_snr"] = True
    if sc.method in ("dpmpp_2m", "dpmpp_multistep"):
        return {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                "solver_order": 2, "final_sigmas_type": "zero", **table}  # fmt: skip
    return {"_class_name": "DDIMScheduler", "set_alpha_to_one": True, "clip_sample": False,
            **table}  # fmt: skip


def _check(task, out: str):
    if not isinstance(task, tasks.DiffusionTask) or task.latents is None:
        raise ValueError("only latent text-to-image runs export to a diffusers pipeline folder")
    if task.conditioning.name != "text" or task.conditioning.tokenizer.kind != "clip":
        raise ValueError("the run must be text-conditioned with a CLIP BPE tokenizer to export")
    if task.model.class_name not in PIPELINES:
        raise ValueError(f"cannot export a {task.model.class_name}; exportable: {list(PIPELINES)}")
    check_new_folder(out, "export target ")


def _save_tokenizer(text, path: str):
    """The run's CLIP tokenizer folder, padding prompts to the run's length as it trained."""
    shutil.copytree(tokenizers.BUILTIN.get(text.tokenizer.path, text.tokenizer.path), path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["model_max_length"] = text.tokenizer.max_length
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def _set_sample_size(path: str, size: int):
    """The latent size diffusers' pipelines default height / width to (our U-Net config does not
    keep it: the network works at any size)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["sample_size"] = int(size)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def export_vae(workdir: str, out: str, step: int | None = None, dtype=None) -> str:
    """A VAE training run (task "autoencoder") as a diffusers AutoencoderKL folder whose
    scaling_factor is measured as latent diffusion configs' "auto" does (1 / std of the latents
    of the run's first train images), so `--config.latents.vae=out` trains as on the workdir."""
    cfg = read_config(workdir)
    check_new_folder(out, "export target ")
    vae, step = restore_ema(cfg, tasks.from_config(cfg), workdir, step)
    scale = latent.measure_scale(vae, cfg.data.name, cfg.data.get("data_dir") or None)
    vae.config = dataclasses.replace(vae.config, scaling_factor=scale, shift_factor=None)

    def write(tmp):
        models.save_diffusers(vae, tmp, dtype=dtype)
        record = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(step),
                  "scaling_factor_measured_on": cfg.data.name, "dtype": dtype}  # fmt: skip
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(record, f, indent=2)

    return write_new_folder(out, write)


def export(workdir: str, out: str, step: int | None = None, dtype=None) -> str:
    """Write the run's pipeline folder to `out` (see module docstring; a VAE run: export_vae);
    `dtype` (e.g. "float16") stores every weight in that type. Returns out."""
    cfg = read_config(workdir)
    if cfg.task == "autoencoder":
        return export_vae(workdir, out, step, dtype)
    task = tasks.from_config(cfg)
    _check(task, out)
    model, step = restore_ema(cfg, task, workdir, step)
    text, space = task.conditioning, task.latents

    def write(tmp):
        net = "unet" if task.model.class_name == "UNet2DConditionModel" else "transformer"
        models.save_diffusers(model.denoiser, os.path.join(tmp, net), dtype=dtype)
        _set_sample_size(os.path.join(tmp, net), cfg.model.config.sample_size)
        vae = space.vae
        vae.config = dataclasses.replace(
            vae.config, scaling_factor=space.scaling_factor, shift_factor=space.shift_factor
        )
        models.save_diffusers(vae, os.path.join(tmp, "vae"), dtype=dtype)
        index = {"_class_name": PIPELINES[task.model.class_name], "_diffusers_version": "0.35.0",
                 net: ["diffusers", task.model.class_name],
                 "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", scheduler_config(task)["_class_name"]]}  # fmt: skip
        encoders = [("", model.text_encoder, text.encoder)]
        if text.encoder_2 is not None:
            encoders.append(("_2", model.text_encoder_2, text.encoder_2))
        for suffix, module, spec in encoders:
            models.save_diffusers(module, os.path.join(tmp, f"text_encoder{suffix}"), dtype=dtype)
            _save_tokenizer(text, os.path.join(tmp, f"tokenizer{suffix}"))
            index[f"text_encoder{suffix}"] = ["transformers", spec.class_name]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        if net == "unet":
            index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                      "image_encoder": [None, None], "requires_safety_checker": False}  # fmt: skip
        else:
            index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None],
                      "image_encoder": [None, None], "feature_extractor": [None, None]}  # fmt: skip
        os.makedirs(os.path.join(tmp, "scheduler"))
        record = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(step),
                  "vae": space.source, "null_tokens": text.null_tokens,
                  "dtype": dtype}  # fmt: skip
        files = {"model_index.json": index, "export.json": record,
                 "scheduler/scheduler_config.json": scheduler_config(task)}  # fmt: skip
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)

    return write_new_folder(out, write)


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a latent text-to-image training run")
    p.add_argument("--out", required=True, help="new (or empty) pipeline folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="store the weights in this type (default: as trained)")  # fmt: skip
    a = p.parse_args()
    print(f"wrote {export(a.workdir, a.out, a.step, a.dtype)}")


if __name__ == "__main__":
    main()
