"""Reading a diffusers pipeline folder: model_index.json, components, tokenizers, scheduler.

A folder (`DiffusionPipeline.save_pretrained`, or the project's own export) holds

    model_index.json            {"_class_name": "StableDiffusionPipeline",
                                 "unet": ["diffusers", "UNet2DConditionModel"], ...}
    unet/ or transformer/       config.json + safetensors (diffusers)
    vae/                        AutoencoderKL (optional: pixel-space models have none)
    text_encoder[_2|_3]/        transformers CLIPTextModel[WithProjection] / T5EncoderModel
    tokenizer[_2|_3]/           transformers CLIPTokenizer (vocab.json + merges.txt) /
                                T5TokenizerFast (tokenizer.json)
    scheduler/scheduler_config.json

Components listed as [null, null] are absent (e.g. SD3 without T5). Networks load through
`models.load_diffusers`; every failure names the component and the file.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax.numpy as jnp

from diffusion import models

# Pipeline class -> family; the img2img / inpaint variants use the same components.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
}
NETWORKS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
            "controlnet")  # fmt: skip
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
# Components a generation never uses (diffusers' safety checker, IP-adapter image encoder).
IGNORED = ("safety_checker", "feature_extractor", "image_encoder", "scheduler")


class PipelineLoadError(ValueError):
    """A pipeline folder that cannot be read (message names the component and file)."""


def read_model_index(path: str) -> dict[str, Any]:
    """model_index.json of a pipeline folder, with its class checked against the supported."""
    file = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise PipelineLoadError(f"{path} is not a directory")
    if not os.path.exists(file):
        raise PipelineLoadError(
            f"no model_index.json in {path}: not a diffusers pipeline folder (a single model "
            "folder with config.json loads with diffusion.models.load_diffusers)"
        )
    try:
        with open(file) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise PipelineLoadError(f"{file} is not valid JSON: {e}") from e
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise PipelineLoadError(
            f"unsupported pipeline class {name!r} in {file}; supported: "
            f"{', '.join(PIPELINE_CLASSES)}"
        )
    return index


def components_of(index: dict[str, Any]) -> dict[str, str | None]:
    """Component name -> library class name (None where the folder has none)."""
    out = {}
    for key, value in index.items():
        if key.startswith("_") or key in IGNORED or not isinstance(value, list | tuple):
            continue
        if len(value) != 2:
            raise PipelineLoadError(f"model_index.json entry {key!r}: expected [library, class]")
        out[key] = value[1]
    return out


def _check_weights(folder: str, component: str) -> None:
    """Open every safetensors file's header: a truncated or corrupt file is named here (the
    safetensors error alone does not say which file)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise PipelineLoadError(f"component {component!r}: no *.safetensors weights in {folder}")
    for file in files:
        try:
            safe_open(file, framework="np")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise PipelineLoadError(
                f"component {component!r}: cannot read weights file {file}: {e} (truncated or "
                "corrupt download?)"
            ) from e


def load_network(path: str, component: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 variant: str | None = None):  # fmt: skip
    """One network component (unet, vae, text_encoder...) with models.load_diffusers."""
    folder = os.path.join(path, component)
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise PipelineLoadError(f"component {component!r}: no config.json in {folder}")
    _check_weights(folder, component)
    try:
        return models.load_diffusers(folder, dtype=dtype, param_dtype=param_dtype, variant=variant)
    except Exception as e:
        raise PipelineLoadError(f"component {component!r} ({folder}): {e}") from e


def load_tokenizer(path: str, component: str, class_name: str):
    """A transformers tokenizer from its folder (offline)."""
    import transformers

    if class_name not in TOKENIZER_CLASSES:
        raise PipelineLoadError(
            f"component {component!r}: tokenizer class {class_name!r} is not supported; "
            f"supported: {TOKENIZER_CLASSES}"
        )
    folder = os.path.join(path, component)
    try:
        return getattr(transformers, class_name).from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise PipelineLoadError(f"component {component!r} ({folder}): {e}") from e


def read_json(path: str, component: str, name: str) -> dict[str, Any]:
    file = os.path.join(path, component, name)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineLoadError(f"component {component!r}: cannot read {file}: {e}") from e


def load_components(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    variant: str | None = None, skip: tuple[str, ...] = ()):  # fmt: skip
    """(model_index, {component: module / tokenizer / None}, {component: raw config.json}).

    variant: diffusers' weight variant ("fp16", "bf16"); skip: networks whose config is read but
    whose weights are not loaded (their entry is None: the caller supplies them)."""
    index = read_model_index(path)
    parts, configs = {}, {}
    for name, cls in components_of(index).items():
        if cls is None:
            parts[name] = None
        elif name in NETWORKS:
            configs[name] = read_json(path, name, "config.json")
            parts[name] = (
                None
                if name in skip
                else load_network(path, name, dtype=dtype, param_dtype=param_dtype, variant=variant)
            )
        elif name in TOKENIZERS:
            parts[name] = load_tokenizer(path, name, cls)
        else:
            raise PipelineLoadError(
                f"unknown component {name!r} ({cls}) in {path}/model_index.json; known: "
                f"{NETWORKS + TOKENIZERS + IGNORED}"
            )
    if (parts.get("unet") is None) == (parts.get("transformer") is None):
        raise PipelineLoadError(f"{path}: need exactly one of 'unet' and 'transformer'")
    return index, parts, configs
