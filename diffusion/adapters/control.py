"""Training a ControlNet (Zhang et al. 2023) on a pretrained latent text-to-image model.

    task = control.from_config(cfg)      # cfg.task = "controlnet"; run with diffusion.train

The model is the base's text encoder and U-Net (frozen, loaded from the base workdir or
pipeline folder, base.py) plus a `ControlNetModel` initialised from that U-Net
(`ControlNetModel.from_unet`: encoder copied, zero convolutions at zero), the only trained part.
Control images come from each training example's layout (concepts.layout_mask: the exact
silhouette of the generator's shapes), at latent size x 2^(len(embedding widths) - 1). Captions
are dropped as the base was trained (classifier-free guidance); the control image never is.
Samples (training grids, evaluations) take their control images from the batch's layouts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import conditioning, tasks
from diffusion.adapters import base, concepts
from diffusion.models.controlnet import ControlledUNet, ControlNetConfig, ControlNetModel


class ControlNetConditioned(conditioning.TextConditioned):
    """TextConditioned(text_encoder, denoiser) plus the ControlNet steering the denoiser."""

    def __init__(self, text_encoder, denoiser, controlnet, text_encoder_2=None):
        super().__init__(text_encoder, denoiser, text_encoder_2)
        self.controlnet = controlnet


class _WithControl(NamedTuple):
    """A model and the control images (B, H, W, 3) of the batch it is about to see: what the
    task's conditioning reads (`text_encoder[_2]`, `denoiser`), with the denoiser the
    ControlNet-steered U-Net, control images tiled to x_t's batch (which guidance doubles)."""

    model: ControlNetConditioned
    control: jax.Array

    @property
    def text_encoder(self):
        return self.model.text_encoder

    @property
    def text_encoder_2(self):
        return self.model.text_encoder_2

    @property
    def denoiser(self):
        unet = ControlledUNet(self.model.denoiser, self.model.controlnet)

        def fn(x, timestep, **kwargs):
            reps = x.shape[0] // self.control.shape[0]
            control = jnp.concatenate([self.control] * reps)  # (B', H, W, 3)
            return unet(x, timestep, controlnet_cond=control, **kwargs)

        return fn


@dataclasses.dataclass(frozen=True)
class ControlNetTask(tasks.DiffusionTask):
    base_path: str = ""
    base_step: int | None = None
    embedding_channels: tuple[int, ...] = (16, 32)
    layout_size: int = 32  # pixel size of the dataset's layout features (shapes/64x64: 64)
    trainable = nnx.All(nnx.Param, nnx.PathContains("controlnet"))

    def _controlnet_config(self, unet_config) -> ControlNetConfig:
        return ControlNetConfig.from_unet(
            unet_config, conditioning_embedding_out_channels=self.embedding_channels
        )

    @property
    def factor(self) -> int:
        return 2 ** (len(self.embedding_channels) - 1)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        m = super().build_model(rngs)
        net = ControlNetModel(self._controlnet_config(m.denoiser.config), rngs=rngs,
                              dtype=self.model.dtype)  # fmt: skip
        return ControlNetConditioned(m.text_encoder, m.denoiser, net, m.text_encoder_2)

    def base(self):
        return base.load_base(self.base_path, self.base_step, self.sampling)

    def pretrained(self) -> dict:
        """The base's weights, and the ControlNet's from_unet initialisation of them."""
        model = self.base()[1]
        net = _from_unet(self.base_path, self.base_step, self.sampling, self.embedding_channels)
        return base.flat_params(model) | net

    def prepare_batch(self, batch: dict) -> dict:
        out = super().prepare_batch(batch)
        size = out["x"].shape[1] * self.factor
        control = concepts.control_images(batch, size, self.layout_size)
        return {**out, "control": control.astype(np.float32)}

    def loss(self, model, batch, rng):
        text = {k: v for k, v in batch.items() if k != "control"}
        return super().loss(_WithControl(model, batch["control"]), text, rng)

    def denoiser(self, model, cond, guidance_scale=1.0):
        text = {k: v for k, v in cond.items() if k != "control"}
        return super().denoiser(_WithControl(model, cond["control"]), text, guidance_scale)

    def sample_grid(self, model, rng, example: dict):
        """Samples for the example batch's first captions and layouts."""
        sc, n = self.sampling, self.sampling.num_images
        cond = {"input_ids": example["input_ids"][:n], "control": example["control"][:n]}
        shape = (n, *example["x"].shape[1:])
        return self.sample(model, rng, cond, shape, method=sc.method, num_steps=sc.num_steps,
                           guidance_scale=sc.guidance_scale, grid=sc.grid)  # fmt: skip


@functools.lru_cache(maxsize=2)
def _from_unet(base_path, base_step, sampling, embedding_channels) -> dict:
    """{("controlnet", ...): array} of ControlNetModel.from_unet(the base's U-Net), built in one
    compiled program (eager construction compiles every initialiser separately) and kept: a
    training run asks for it twice (initial state, frozen weights)."""
    unet = base.load_base(base_path, base_step, sampling)[1].denoiser

    @nnx.jit
    def build(unet):
        net = ControlNetModel.from_unet(
            unet, rngs=nnx.Rngs(0), conditioning_embedding_out_channels=embedding_channels
        )
        return nnx.state(net, nnx.Param)

    flat = nnx.to_flat_state(build(unet))
    return {("controlnet", *p): v.get_value() for p, v in flat}


def from_config(cfg) -> ControlNetTask:
    """The ControlNet training task of a config with task="controlnet"
    (configs/shapes_controlnet.py)."""
    c = cfg.controlnet
    return ControlNetTask(
        **base.task_fields(cfg, "controlnet"),
        embedding_channels=tuple(c.get("conditioning_embedding_out_channels", (16, 32))),
        layout_size=64 if cfg.data.name.endswith("64x64") else 32,
    )  # fmt: skip
