"""The three pipeline families (prompt assembly in prompts.py) and `load(path)`."""

from __future__ import annotations

import jax.numpy as jnp

from diffusion.pipelines import loading, prompts, schedulers
from diffusion.pipelines.pipeline import Pipeline


class StableDiffusionPipeline(Pipeline):
    """SD 1.x / 2.x (eps or v-prediction), img2img and inpainting (incl. 9-channel U-Nets)."""

    family = "sd"
    default_guidance = 7.5

    def _encode(self, texts, clip_skip, *, height=None, width=None):
        return prompts.encode_sd(self, texts, clip_skip=clip_skip)


class StableDiffusionXLPipeline(Pipeline):
    """SDXL: two CLIP encoders, pooled text embedding and size micro-conditioning."""

    family = "sdxl"
    default_guidance = 5.0

    def _encode(self, texts, clip_skip, **kw):
        return prompts.encode_sdxl(self, texts, clip_skip=clip_skip)

    def _empty(self, cond, texts, **kw):
        if self.model_index.get("force_zeros_for_empty_prompt", True):
            return {k: jnp.zeros_like(v) for k, v in cond.items()}
        return self._encode([""] * len(texts), None)

    def _finish(self, cond, *, height=None, width=None, original_size=None,
                crops_coords_top_left=(0, 0), target_size=None):  # fmt: skip
        """Adds SDXL's time_ids (original size, crop top-left, target size; default the
        output size, as diffusers)."""
        if "time_ids" in cond:
            return cond
        size = (height, width)
        ids = prompts.sdxl_time_ids(
            cond["encoder_hidden_states"].shape[0], original_size or size,
            crops_coords_top_left, target_size or size,
        )  # fmt: skip
        return {**cond, "time_ids": ids}


class StableDiffusion3Pipeline(Pipeline):
    """SD3 / SD3.5: CLIP-L + CLIP-G + optional T5, MMDiT with rectified flow."""

    family = "sd3"
    default_guidance = 7.0

    def _encode(self, texts, clip_skip, *, height=None, width=None, max_sequence_length=256):
        return prompts.encode_sd3(
            self, texts, clip_skip=clip_skip, max_sequence_length=max_sequence_length
        )


FAMILIES = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
}


def load(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, scheduler: dict | None = None,
         mesh=None, variant: str | None = None, vae: str | None = None) -> Pipeline:  # fmt: skip
    """A pipeline object from a diffusers pipeline folder (see loading.py for the layout).

    scheduler: a scheduler_config.json dict replacing the folder's (as diffusers'
    `scheduler=` argument); mesh: a sharding mesh (default: the batch over all devices);
    variant: diffusers' weight variant ("fp16", "bf16"; loaded into `param_dtype`); vae: a VAE
    folder or single file replacing the folder's (single_file.load_vae).
    """
    skip = ("vae",) if vae is not None else ()
    index, parts, configs = loading.load_components(
        path, dtype=dtype, param_dtype=param_dtype, variant=variant, skip=skip
    )
    if vae is not None:
        from diffusion.pipelines.single_file import load_vae

        parts["vae"] = load_vae(vae, configs.get("vae"), dtype=dtype, param_dtype=param_dtype)
    config = scheduler or loading.read_json(path, "scheduler", "scheduler_config.json")
    try:
        spec = schedulers.from_config(config)
    except ValueError as e:
        raise loading.PipelineLoadError(f"component 'scheduler' ({path}/scheduler): {e}") from e
    cls = FAMILIES[loading.PIPELINE_CLASSES[index["_class_name"]]]
    return cls(parts, spec, model_index=index, configs=configs, mesh=mesh)
