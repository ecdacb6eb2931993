"""What a Stable Diffusion single-file checkpoint contains, and which architecture it is.

The architectures (original LDM / sgm layout; the prefix of each component's keys, the key map
of diffusion/models/ldm_keys.py it uses, and the built-in config used without `config=`):

    sd1           model.diffusion_model.  first_stage_model.  cond_stage_model.transformer.
                  (CLIP ViT-L/14, transformers names)
    sd2           ... cond_stage_model.model.  (OpenCLIP ViT-H/14: resblocks, fused in_proj)
    sdxl          ... conditioner.embedders.0.transformer. (CLIP-L)
                      conditioner.embedders.1.model. (OpenCLIP ViT-bigG/14 + text_projection)
    sdxl-refiner  ... conditioner.embedders.0.model. only (recognised; not loadable yet)

Detection goes by the component prefixes (the text encoder's layout tells SD1 from SD2 from
SDXL), so it works for files of any size; diffusers' `infer_diffusers_model_type` looks at fixed
keys of the full-size models (e.g. `input_blocks.2.1...attn2.to_k` of width 1024 for v2) and
agrees on published files. A U-Net with 9 input channels is an inpainting model.

SD 2.x v-prediction (768-v) and epsilon (512-base) files have the same keys and shapes, so the
prediction type cannot be read from the weights: see `single_file.prediction_type_hint`.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

from diffusion.models import presets
from diffusion.pipelines.loading import PipelineLoadError

UNET = "model.diffusion_model."
VAE = "first_stage_model."

# The SD 2.x text encoder as diffusers stores it: OpenCLIP ViT-H/14's text tower without the
# last of its 24 blocks (SD2 conditions on the penultimate layer) and without the projection.
OPENCLIP_H = {**presets.CLIP_L, "hidden_act": "gelu", "hidden_size": 1024,
              "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
              "projection_dim": 512}  # fmt: skip
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
          "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Component:
    name: str  # diffusers component name
    prefix: str  # key prefix in the single file
    kind: str  # ldm_keys key map: unet, vae, clip, openclip
    preset: dict  # built-in config (published model) used when no config is given


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    pipeline: str  # diffusers pipeline class
    components: tuple[Component, ...]
    tokenizers: tuple[tuple[str, str], ...]  # (component, pad token) of the published folders
    scheduler: dict  # the published folder's scheduler_config.json
    loadable: bool = True

    def component(self, name: str) -> Component:
        return {c.name: c for c in self.components}[name]


def _arch(name, pipeline, text, scheduler, *, unet, vae, tokenizers, loadable=True):
    comps = (Component("unet", UNET, "unet", presets.get_preset(unet)),
             Component("vae", VAE, "vae", presets.get_preset(vae)), *text)  # fmt: skip
    return Architecture(name, pipeline, comps, tokenizers, scheduler, loadable)


_CLIP_L_SDXL = Component("text_encoder", "conditioner.embedders.0.transformer.", "clip",
                         presets.get_preset("clip-l"))  # fmt: skip
ARCHITECTURES = {
    "sd1": _arch(
        "sd1", "StableDiffusionPipeline",
        (Component("text_encoder", "cond_stage_model.transformer.", "clip",
                   presets.get_preset("clip-l")),),
        {"_class_name": "PNDMScheduler", **_BETAS, "skip_prk_steps": True,
         "prediction_type": "epsilon"},
        unet="sd15-unet", vae="sd-vae", tokenizers=(("tokenizer", "<|endoftext|>"),),
    ),
    "sd2": _arch(
        "sd2", "StableDiffusionPipeline",
        (Component("text_encoder", "cond_stage_model.model.", "openclip", OPENCLIP_H),),
        {"_class_name": "DDIMScheduler", **_BETAS, "clip_sample": False,
         "prediction_type": "v_prediction"},
        unet="sd21-unet", vae="sd-vae", tokenizers=(("tokenizer", "!"),),
    ),
    "sdxl": _arch(
        "sdxl", "StableDiffusionXLPipeline",
        (_CLIP_L_SDXL, Component("text_encoder_2", "conditioner.embedders.1.model.", "openclip",
                                 presets.get_preset("openclip-g"))),
        {"_class_name": "EulerDiscreteScheduler", **_BETAS, "interpolation_type": "linear",
         "timestep_spacing": "leading", "prediction_type": "epsilon"},
        unet="sdxl-unet", vae="sdxl-vae",
        tokenizers=(("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")),
    ),
    "sdxl-refiner": _arch(
        "sdxl-refiner", "StableDiffusionXLImg2ImgPipeline",
        (Component("text_encoder_2", "conditioner.embedders.0.model.", "openclip",
                   presets.get_preset("openclip-g")),),
        {}, unet="sdxl-unet", vae="sdxl-vae", tokenizers=(("tokenizer_2", "!"),),
        loadable=False,
    ),
}  # fmt: skip
# The pipeline class of an inpainting (9-channel U-Net) file.
INPAINT = {"StableDiffusionPipeline": "StableDiffusionInpaintPipeline",
           "StableDiffusionXLPipeline": "StableDiffusionXLInpaintPipeline"}  # fmt: skip

# Entries real files carry that are not weights of the pipeline's networks: the DDPM schedule
# buffers of LatentDiffusion, EMA bookkeeping, the CLIP position_ids buffer, OpenCLIP's
# logit_scale and attention-mask buffer, sgm's denoiser sigmas.
NOT_WEIGHTS = re.compile(
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef[12]|logvar"
    r"|lvlb_weights|scale_factor|model_ema\.decay|model_ema\.num_updates|denoiser\.sigmas"
    r"|.*\.position_ids|.*logit_scale|.*\.attn_mask)"
)
EMA_PREFIX = "model_ema."
_LORA = re.compile(r"(^lora_(unet|te\d?)_)|(\.lora_(up|down|A|B)\.)|(\.alpha$)|(\.(hada|lokr)_w)")
_OTHER_FAMILIES = {"joint_blocks.": "SD3 (MMDiT)", "double_blocks.": "FLUX",
                   "model.diffusion_model.joint_blocks.": "SD3 (MMDiT)",
                   "model.diffusion_model.double_blocks.": "FLUX"}  # fmt: skip


class SingleFileError(PipelineLoadError):
    """A single-file checkpoint that cannot be loaded (message names the file and tensors)."""


class LayoutError(SingleFileError):
    """A file that is not a single-file checkpoint of a known architecture."""


@dataclasses.dataclass(frozen=True)
class Detection:
    arch: Architecture
    in_channels: int  # of the U-Net (9: inpainting)
    has_ema: bool  # full EMA copy of the U-Net under model_ema.

    @property
    def pipeline(self) -> str:
        if self.in_channels == 9:
            return INPAINT.get(self.arch.pipeline, self.arch.pipeline)
        return self.arch.pipeline


def _has(keys, prefix) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _summary(keys, n=12) -> str:
    """The file's keys grouped by their first two dotted components, with counts."""
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    lines = [f"    {g}.* ({c} tensors)" for g, c in groups.most_common(n)]
    if len(groups) > n:
        lines.append(f"    ... and {len(groups) - n} more groups")
    return "\n".join(lines)


def _known() -> str:
    lines = []
    for arch in ARCHITECTURES.values():
        lines.append(f"    {arch.name}: " + ", ".join(f"{c.prefix}*" for c in arch.components))
    return "\n".join(lines)


def check_not_other(keys: list[str], file: str) -> None:
    """Clear errors for files that are not full checkpoints: LoRA, a VAE, a diffusers model."""
    lora = [k for k in keys if _LORA.search(k)]
    if lora and len(lora) * 2 >= len(keys):
        raise LayoutError(
            f"{file} is a LoRA file ({len(lora)} of {len(keys)} tensors are LoRA factors, e.g. "
            f"{lora[0]!r}), not a full checkpoint: load a base checkpoint and apply the LoRA to it"
        )
    if not _has(keys, UNET):
        vae_keys = [k for k in keys if re.match(r"(first_stage_model\.|vae\.)?(en|de)coder\.", k)]
        if vae_keys and len(vae_keys) * 2 >= len(keys):
            raise LayoutError(
                f"{file} holds a VAE only ({len(vae_keys)} encoder/decoder tensors), not a full "
                "checkpoint: pass it as vae=... to pipelines.load / load_single_file"
            )
        if _has(keys, "down_blocks.") and _has(keys, "up_blocks."):
            raise LayoutError(
                f"{file} is a diffusers-layout U-Net (down_blocks.*), not an original-layout "
                "single file: put it in a folder with its config.json and use "
                "diffusion.models.load_diffusers"
            )
    for prefix, family in _OTHER_FAMILIES.items():
        if _has(keys, prefix):
            raise LayoutError(f"{file} is a {family} checkpoint; single files load for: "
                              f"{', '.join(ARCHITECTURES)}")  # fmt: skip


def detect(keys: list[str], shape_of, file: str = "checkpoint") -> Detection:
    """The architecture of a single file from its keys; `shape_of(key)` gives a tensor's shape.

    Raises LayoutError listing the known architectures and the keys that fit none of them."""
    check_not_other(keys, file)
    found = None
    if _has(keys, UNET):
        for name in ("sdxl", "sdxl-refiner", "sd1", "sd2"):  # most specific first
            arch = ARCHITECTURES[name]
            text = [c.prefix for c in arch.components if c.name.startswith("text_encoder")]
            others = [c.prefix for a in ARCHITECTURES.values() if a is not arch
                      for c in a.components if c.prefix not in text and c.kind != "unet"
                      and c.kind != "vae"]  # fmt: skip
            if all(_has(keys, p) for p in text) and not any(_has(keys, p) for p in others):
                found = arch
                break
    if found is None:
        known = {c.prefix for a in ARCHITECTURES.values() for c in a.components}
        misfits = [k for k in keys if not any(k.startswith(p) for p in known)
                   and not NOT_WEIGHTS.fullmatch(k) and not k.startswith(EMA_PREFIX)]  # fmt: skip
        have = [p for p in sorted(known) if _has(keys, p)]
        raise LayoutError(
            f"unrecognised checkpoint layout in {file}.\nKnown architectures (key prefixes):\n"
            f"{_known()}\nPrefixes found: {have or 'none'}\nKeys that fit none of them "
            f"({len(misfits)}):\n{_summary(misfits) if misfits else '    none'}"
        )
    conv_in = UNET + "input_blocks.0.0.weight"
    in_channels = int(shape_of(conv_in)[1]) if conv_in in keys else 4
    has_ema = sum(k.startswith(EMA_PREFIX) for k in keys) > 2
    return Detection(found, in_channels, has_ema)


def ema_key(key: str) -> str:
    """The EMA copy's key of a U-Net key: LitEma stores `model.diffusion_model.a.b.weight` as
    `model_ema.diffusion_modela.bweight` (the name after `model.` with its dots removed)."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def scheduler_config(arch: Architecture, prediction_type: str | None) -> dict:
    cfg = dict(arch.scheduler)
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return cfg


def model_index(arch_or_pipeline: str, components: dict[str, str], scheduler: str) -> dict:
    """A model_index.json for a pipeline class, given {component: library class name}."""
    index = {"_class_name": arch_or_pipeline, "_diffusers_version": "0.42.1"}
    for name, cls in components.items():
        lib = "diffusers" if name in ("unet", "vae") else "transformers"
        index[name] = [lib, cls] if cls else [None, None]
    index["scheduler"] = ["diffusers", scheduler]
    if arch_or_pipeline.startswith("StableDiffusionXL"):
        index["force_zeros_for_empty_prompt"] = True
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False}  # fmt: skip
    return index
