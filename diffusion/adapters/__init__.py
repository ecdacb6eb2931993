"""Adapters on the models: LoRA (inject, merge, files), DreamBooth and ControlNet training.

    from diffusion import adapters
    adapters.inject(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, rngs=nnx.Rngs(0))
    adapters.load_lora(unet, "lora.safetensors", prefix="unet", scale=0.8)
    adapters.save_lora("out/", {"unet": unet, "text_encoder": text_encoder})

lora.py: the adapted layers and their bookkeeping; files.py: diffusers / PEFT / kohya files;
finetune.py: LoRA / full fine-tuning and DreamBooth as a training task; control.py: ControlNet
training. Pipelines expose the same as `pipe.load_lora_weights` / `pipe.set_adapters`.
"""

from diffusion.adapters.files import LoRAFileError, load_lora, save_lora
from diffusion.adapters.lora import (
    LoRAParam,
    adapters,
    inject,
    merge,
    set_adapters,
    unload,
    unmerge,
)

__all__ = [
    "LoRAFileError",
    "LoRAParam",
    "adapters",
    "inject",
    "load_lora",
    "merge",
    "save_lora",
    "set_adapters",
    "unload",
    "unmerge",
]
