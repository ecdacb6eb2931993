"""LoRA and ControlNet on pipelines, with diffusers' names (diffusion/adapters/ does the work).

    pipe.load_lora_weights("style.safetensors", adapter_name="style", scale=1.0)
    pipe.load_lora_weights("kohya_subject.safetensors")          # stacks "default_1"
    pipe.set_adapters(["style", "default_1"], [0.7, 1.0])
    images = pipe.text_to_image("a photo of sks dog")
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()

After `load_lora_weights`, `pipe.unet(...)` / `pipe.transformer(...)` / `pipe.text_encoder(...)`
are the adapted models. A file may hold any of the pipeline's unet / transformer /
text_encoder[_2] components, in diffusers / PEFT or kohya (A1111) format (adapters/files.py).

    pipe = pipe.with_controlnet(models.load_diffusers("controlnet_folder"))
    images = pipe.text_to_image("a cat", control_image=edges, controlnet_conditioning_scale=0.8)

A ControlNet pipeline's denoiser is the U-Net with the ControlNet's residuals added
(models.controlnet.ControlledUNet); the control image, NHWC in [0, 1] (or uint8) at the output
size, goes with both the conditional and unconditional passes, as diffusers'
StableDiffusionControlNetPipeline (guess_mode=False).
"""

from __future__ import annotations

import copy

import numpy as np

from diffusion.adapters import files, lora

LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class Adapters:
    """Mixin of pipeline.Pipeline: LoRA loading, weighting, fusing, saving."""

    def _lora_models(self) -> dict:
        return {c: getattr(self, c) for c in LORA_COMPONENTS if getattr(self, c) is not None}

    def _changed(self) -> None:
        """Adapters change the networks: drop the cached splits / placed weights."""
        if getattr(self, "quantized", False):
            raise ValueError(
                "LoRA changes the denoiser's weights: load it before quantize_denoiser"
            )
        self._split, self._placed = {}, {}

    def load_lora_weights(self, path, *, adapter_name: str | None = None, scale: float = 1.0):
        """Add the LoRA file `path` (a file, a folder holding one, or a state dict) to every
        component it covers as adapter `adapter_name` (default: default_<i>), its deltas scaled
        by `scale`. A second call stacks another adapter. Returns the adapter name."""
        tensors, metadata = files.read(path)
        parsed = files.parse(tensors)
        models = self._lora_models()
        missing = [str(c) for c in parsed if c not in models]
        if missing:
            raise files.LoRAFileError(
                f"{path} holds LoRA weights for {missing}, which this pipeline lacks (it has "
                f"{sorted(models)}); a bare model's LoRA loads with adapters.load_lora(model, "
                "path, prefix=None)"
            )
        name = adapter_name or files.next_adapter_name(*models.values())
        if name in set().union(*(lora.adapters(m) for m in models.values())):
            raise ValueError(f"adapter name {name!r} is already in use in this pipeline")
        self._changed()
        for component, entries in parsed.items():
            files.apply(models[component], entries, metadata, component, adapter_name=name,
                        scale=scale, source=str(path))  # fmt: skip
        return name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate these adapters with these weights (one number or one per name); the others
        get weight 0. Components that lack a named adapter ignore that name."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights
        if weights is None or isinstance(weights, int | float):
            weights = [1.0 if weights is None else weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        known = set().union(*(lora.adapters(m) for m in self._lora_models().values()))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; this pipeline has {sorted(known)}")
        self._changed()
        for model in self._lora_models().values():
            have = lora.adapters(model)
            pairs = [(n, w) for n, w in zip(names, weights) if n in have]
            if have:
                lora.set_adapters(model, [n for n, _ in pairs], [w for _, w in pairs])

    def get_active_adapters(self) -> dict[str, list[str]]:
        """{component: adapter names}."""
        return {c: sorted(lora.adapters(m)) for c, m in self._lora_models().items()}

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names=None) -> None:
        """Merge the adapters into the base weights (scaled by lora_scale)."""
        self._changed()
        for model in self._lora_models().values():
            have = lora.adapters(model)
            names = [n for n in (adapter_names or have) if n in have]
            if names:
                lora.merge(model, names, scale=lora_scale)

    def unfuse_lora(self) -> None:
        self._changed()
        for model in self._lora_models().values():
            lora.unmerge(model)

    def unload_lora_weights(self) -> None:
        """Remove every adapter (fused ones stay in the weights, as PEFT's merge_and_unload)."""
        self._changed()
        for model in self._lora_models().values():
            lora.unload(model)

    def save_lora_weights(self, path: str, adapter_name: str = lora.DEFAULT_ADAPTER) -> str:
        """Write one adapter of every component as a file diffusers' load_lora_weights reads."""
        return files.save_lora(path, self._lora_models(), adapter_name)

    # ------------------------------------------------------------------ ControlNet
    def with_controlnet(self, controlnet):
        """The same components steered by `controlnet` (a models.ControlNetModel; None
        removes it)."""
        if controlnet is not None and self.unet is None:
            raise ValueError("a ControlNetModel steers a U-Net; this pipeline has a transformer")
        other = copy.copy(self)
        other.controlnet, other._split, other._placed = controlnet, {}, {}
        return other

    def _control(self, cond, uncond, image, scale, batch: int, height: int, width: int):
        """cond / uncond with the control image (B, H, W, C) and per-example scale (B,)."""
        net = getattr(self, "controlnet", None)
        if (image is None) != (net is None):
            raise ValueError("control_image needs a ControlNet pipeline (with_controlnet) and "
                             "a ControlNet pipeline needs control_image")  # fmt: skip
        if image is None:
            return cond, uncond
        arr = np.asarray(image)
        arr = arr[None] if arr.ndim == 3 else arr
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
        want = (height, width, net.config.conditioning_channels)
        if arr.ndim != 4 or arr.shape[1:] != want or arr.shape[0] not in (1, batch):
            raise ValueError(
                f"control_image has shape {arr.shape}; expected (B, H, W, C) = ({batch}, "
                f"{want[0]}, {want[1]}, {want[2]}) (or a batch of one): the output size and the "
                "ControlNet's conditioning_channels"
            )
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError("control_image values must lie in [0, 1] (float) or be uint8")
        extra = {"controlnet_cond": np.broadcast_to(arr, (batch, *want)),
                 "conditioning_scale": np.full((batch,), scale, np.float32)}  # fmt: skip
        return cond | extra, None if uncond is None else uncond | extra
