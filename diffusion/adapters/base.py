"""The pretrained model a fine-tuning run starts from: a training workdir or a pipeline folder.

    task, model = load_base("/runs/shapes_ldm_unet")       # EMA weights of the latest step
    task, model = load_base("/exports/shapes_sd")          # a StableDiffusionPipeline folder
    task, model = load_base("benchmarks/results/shapes_ldm_mmdit/pipeline")   # SD3, no T5

Both give a latent text-to-image `tasks.DiffusionTask` (schedule, objective, text conditioning,
frozen VAE) and its model (`conditioning.TextConditioned(text_encoder, unet)`) with the
structure `task.build_model` builds, so the pretrained weights line up with a fine-tuning
model by path. A pipeline folder must be SD1/2-style (one CLIP text encoder, a U-Net, a VAE) or
SD3-style without T5 (two CLIP encoders with projection, an MMDiT, a VAE; tools.export_pipeline's
SD3 export).
"""

from __future__ import annotations

import dataclasses
import functools
import os

from flax import nnx

from diffusion import conditioning, losses, tasks
from diffusion.data import tokenizer as tokenizers
from diffusion.latent import LatentSpace
from diffusion.models import ModelSpec


def _from_folder(path: str, sampling: tasks.Sampling):
    from diffusion import pipelines

    pipe = pipelines.load(path)
    sd = pipe.family == "sd" and pipe.unet is not None and pipe.text_encoder is not None
    sd3 = (pipe.family == "sd3" and pipe.transformer is not None
           and pipe.text_encoder_2 is not None and pipe.text_encoder_3 is None)  # fmt: skip
    if not (sd or sd3) or pipe.vae is None:
        raise ValueError(
            f"{path}: fine-tuning needs an SD1/2-style pipeline folder (U-Net, one CLIP text "
            "encoder, VAE) or an SD3 one without T5 (MMDiT, two CLIP encoders, VAE; as "
            f"tools.export_pipeline writes); this one is {pipe.model_index['_class_name']}"
        )
    spec, tok = pipe.scheduler, pipe.tokenizer
    max_length = int(tok.model_max_length)
    encode = lambda texts: tok(texts, padding="max_length", max_length=max_length,
                               truncation=True).input_ids  # fmt: skip  # as diffusers' SD
    folder = os.path.join(path, "tokenizer")
    spec_of = lambda m: ModelSpec(m.config.class_name, m.config)
    if sd:
        layout = {"hidden_state": -1, "pooled_as": None}
        objective = losses.Objective(spec.schedule, prediction_type=spec.prediction_type)
    else:  # SD3's prompt layout without T5 (tokenizer_2 is the same CLIP vocabulary)
        layout = {"encoder_2": spec_of(pipe.text_encoder_2), "hidden_state": -2,
                  "pooled_as": "pooled_projections",
                  "context_dim": pipe.transformer.config.joint_attention_dim}  # fmt: skip
        objective = losses.Objective(spec.schedule, prediction_type=spec.prediction_type,
                                     time_density="logit_normal")  # fmt: skip  # as SD3 trains
    text = conditioning.Text(
        tokenizer=tokenizers.Tokenizer(encode, max_length, len(tok), "clip", folder),
        encoder=spec_of(pipe.text_encoder), **layout,
    )  # fmt: skip
    vae = pipe.vae.config
    task = tasks.DiffusionTask(
        model=ModelSpec(
            "UNet2DConditionModel" if sd else "SD3Transformer2DModel", pipe.denoiser.config
        ),
        schedule=spec.schedule,
        objective=objective,
        conditioning=text,
        sampling=sampling,
        data_key="latent",
        latents=LatentSpace(pipe.vae, vae.scaling_factor, vae.shift_factor or 0.0, path),
    )
    return task, conditioning.TextConditioned(pipe.text_encoder, pipe.denoiser,
                                              pipe.text_encoder_2 if sd3 else None)  # fmt: skip


@functools.lru_cache(maxsize=2)
def load_base(path: str, step: int | None = None, sampling: tasks.Sampling | None = None):
    """(DiffusionTask, model with the pretrained weights) from a workdir or pipeline folder.
    `sampling` replaces the base's sampling settings (a folder has none of its own)."""
    from diffusion.train_state import restore_ema
    from diffusion.workdir import read_config

    sampling = sampling or tasks.Sampling()
    if os.path.exists(os.path.join(path, "model_index.json")):
        return _from_folder(path, sampling)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise FileNotFoundError(
            f"{path} is neither a training workdir (config.json + "
            "checkpoints/) nor a diffusers pipeline folder (model_index.json)"
        )
    cfg = read_config(path)
    task = tasks.from_config(cfg)
    if not isinstance(task, tasks.DiffusionTask) or task.conditioning.name != "text":
        raise ValueError(f"{path} is not a text-to-image diffusion run (task {cfg.task!r})")
    model, _ = restore_ema(cfg, task, path, step)
    return dataclasses.replace(task, sampling=sampling), model


def flat_params(model, prefix: tuple = ()) -> dict[tuple, object]:
    """{path: array} of a model's nnx.Params (paths prefixed by `prefix`)."""
    return {prefix + p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def task_fields(cfg, section: str) -> dict:
    """The fields of a fine-tuning task from config section `section` (finetune, controlnet):
    the base task's fields (schedule, objective, conditioning, latents, with the config's
    sampling) plus base_path and base_step."""
    c = cfg[section]
    if not c.get("base"):
        raise ValueError(
            f"{section} needs its base model: --config.{section}.base=PATH (a text-to-image "
            "training workdir or a diffusers pipeline folder)"
        )
    sampling = tasks.Sampling.from_config(cfg.sample)
    base_task, _ = load_base(c.base, c.get("base_step"), sampling)
    fields = {f.name: getattr(base_task, f.name) for f in dataclasses.fields(base_task)}
    return fields | {"base_path": c.base, "base_step": c.get("base_step")}
