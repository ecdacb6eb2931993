"""Prompt -> image with Stable Diffusion 1/2, SDXL and SD3 diffusers folders, in JAX.

    pipe = pipelines.load("path/to/stable-diffusion-folder")
    images = pipe.text_to_image("a photo of a cat", num_steps=30, guidance_scale=7.5)

`load` reads model_index.json (loading.py) into a StableDiffusionPipeline,
StableDiffusionXLPipeline or StableDiffusion3Pipeline (families.py) holding the components
under diffusers' names and the folder's scheduler as our method + grid + schedule
(schedulers.py). Methods (generation.py, extras.py): text_to_image, image_to_image, inpaint,
hires_fix, prompt_travel, composable_text_to_image; each generation is one compiled program
(programs.py); `quantize_denoiser()` stores the denoiser's kernels as int8 (quantize.py).

Single-file checkpoints in the original LDM layout (A1111 / Civitai): `load_single_file(path,
config=...)` (single_file.py, detection in single_file_layout.py, key maps in
models/ldm_keys.py) and `save_single_file(folder, path)` (single_file_write.py).
"""

from diffusion.pipelines.families import (
    FAMILIES,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    load,
)
from diffusion.pipelines.loading import PIPELINE_CLASSES, PipelineLoadError
from diffusion.pipelines.pipeline import Pipeline
from diffusion.pipelines.schedulers import SCHEDULERS, SchedulerSpec
from diffusion.pipelines.single_file import SingleFileError, load_single_file, load_vae
from diffusion.pipelines.single_file_layout import ARCHITECTURES, LayoutError, detect
from diffusion.pipelines.single_file_write import save_pipeline_folder, save_single_file

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "LayoutError",
    "SingleFileError",
    "detect",
    "load_single_file",
    "load_vae",
    "save_pipeline_folder",
    "save_single_file",
    "PIPELINE_CLASSES",
    "SCHEDULERS",
    "Pipeline",
    "PipelineLoadError",
    "SchedulerSpec",
    "StableDiffusion3Pipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "load",
]
