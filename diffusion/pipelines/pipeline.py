"""Stable Diffusion 1/2, SDXL and SD3 pipelines: prompt (+ image, mask) -> images.

A pipeline holds its components under diffusers' names (`unet` or `transformer`, `vae`,
`text_encoder[_2|_3]`, `tokenizer[_2|_3]`) and the folder's scheduler as a SchedulerSpec
(method, options, schedule, grid). Every method returns float32 (B, H, W, 3) numpy images in
[0, 1] (diffusers' output_type="np"); `latents` / `noise` are NHWC at the latent resolution.
Each generation is one compiled program (programs.py) per shape and setting; text encoding runs
before it. With several devices the batch is split over a ("data",) mesh of gcd(B, devices)
devices, weights replicated (`mesh=` sets one explicitly).
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from diffusion import samplers, sharding
from diffusion.models.controlnet import ControlledUNet
from diffusion.pipelines import (
    adapters,
    extras,
    generation,
    images,
    programs,
    prompts,
    quantize,
    schedulers,
)

COMPONENTS = (
    "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
    "tokenizer", "tokenizer_2", "tokenizer_3", "controlnet",
)  # fmt: skip


class Pipeline(generation.Generation, extras.Extras, adapters.Adapters):
    """Base class; see StableDiffusionPipeline / StableDiffusionXLPipeline /
    StableDiffusion3Pipeline for the prompt assembly of each family."""

    family = ""
    default_guidance = 7.5

    def __init__(
        self, components: dict, scheduler: schedulers.SchedulerSpec, *,
        model_index: dict | None = None, configs: dict | None = None, mesh=None,
    ):  # fmt: skip
        for name in COMPONENTS:
            setattr(self, name, components.get(name))
        self.scheduler = scheduler
        self.model_index = dict(model_index or {})
        self.configs = dict(configs or {})  # raw config.json of each network component
        self.mesh = mesh
        self.quantized = False
        self._split = {}  # component -> (graphdef, state)
        self._placed = {}  # (component, devices) -> placed state

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self):
        if self.controlnet is not None:  # a fresh wrapper each time: the split is cached
            return ControlledUNet(self.unet, self.controlnet)
        return self.unet if self.unet is not None else self.transformer

    @property
    def kind(self) -> str:
        return "unet" if self.unet is not None else "mmdit"

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else self.vae.config.downsample_factor

    @property
    def size_factor(self) -> int:
        """Height and width must be multiples of this (VAE factor x patch size)."""
        patch = getattr(self.denoiser.config, "patch_size", 1) if self.kind == "mmdit" else 1
        return self.vae_scale_factor * patch

    @property
    def latent_channels(self) -> int:
        cfg = self.denoiser.config
        return cfg.out_channels if self.kind == "unet" else cfg.out_dim

    def default_size(self) -> tuple[int, int]:
        """(height, width) from the denoiser's sample_size, as diffusers."""
        name = "unet" if self.kind == "unet" else "transformer"
        size = self.configs.get(name, {}).get("sample_size", 64)
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    # ------------------------------------------------------------------ variants
    def with_scheduler(self, config: dict) -> Pipeline:
        """The same components with another scheduler (a scheduler_config.json dict)."""
        other = copy.copy(self)
        other.scheduler = schedulers.from_config(config)
        return other

    def quantize_denoiser(self, min_size: int = 1024) -> Pipeline:
        """A pipeline whose denoiser weights are int8 (quantize.py), dequantized in-program."""
        other = copy.copy(self)
        gd, state = self._graph("denoiser")
        other._split = {
            **self._split,
            "denoiser": (gd, quantize.quantize_int8(state, min_size=min_size)),
        }
        other._placed, other.quantized = {}, True
        return other

    # ------------------------------------------------------------------ prompts
    def _encode(self, prompts: list[str], clip_skip, **kw) -> dict:
        raise NotImplementedError

    def _empty(self, cond: dict, prompts: list[str], **kw) -> dict:
        """Unconditional conditioning when negative_prompt is None: the empty prompt."""
        return self._encode([""] * len(prompts), None, **kw)

    def _finish(self, cond: dict, **kw) -> dict:
        return cond

    def encode_prompt(self, prompt, negative_prompt=None, *, guided: bool = True,
                      num_images_per_prompt: int = 1, clip_skip=None, **kw):  # fmt: skip
        """(cond, uncond) conditioning pytrees with a leading batch axis (uncond None when not
        guided). Family keywords: SDXL original_size / crops_coords_top_left / target_size,
        SD3 max_sequence_length."""
        texts = prompts.as_prompts(prompt, num_images_per_prompt)
        negatives = prompts.as_negatives(negative_prompt, texts, num_images_per_prompt)
        cond = self._encode(texts, clip_skip, **kw)
        uncond = None
        if guided:
            if negatives is None:
                uncond = self._empty(cond, texts, **kw)
            else:
                uncond = self._encode(negatives, None, **kw)
            uncond = self._finish(uncond, **kw)
        return self._finish(cond, **kw), uncond

    # ------------------------------------------------------------------ planning
    def _times(self, num_steps, method, grid, sampler_options):
        """(method, options, grid ts). method None: the folder's scheduler (its method, options
        and diffusers' timesteps); another method: its own default grid (samplers.GRIDS)
        unless `grid` (a name or an explicit decreasing array) is given."""
        spec = self.scheduler
        if method is None:
            method, options = spec.method, dict(spec.options)
            grid = spec.grid(num_steps) if grid is None else grid
        else:
            grid = samplers.get(method).default_grid if grid is None else grid  # checks the name
            options = {}
        options.update(sampler_options or {})
        if isinstance(grid, str):
            sched, kw = spec.schedule, {}
            if grid in ("leading", "trailing"):
                kw["steps_offset"] = int(spec.get("steps_offset", 0) or 0)
            elif sched.family == "flow":  # one training step inside t = 1, where alpha = 0
                kw["t_start"] = sched.t_max - sched.t_min  # (as diffusers' use_flow_sigmas)
            ts = np.asarray(samplers.time_grid(sched, grid, num_steps, **kw), np.float64)
        else:
            ts = np.asarray(samplers.check_grid(grid), np.float64)
        return method, tuple(sorted(options.items())), ts

    @staticmethod
    def _truncate(ts: np.ndarray, strength: float) -> np.ndarray:
        """diffusers' get_timesteps: the last int(num_steps * strength) steps of the grid."""
        if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        n = len(ts) - 1
        steps = min(int(n * strength), n)
        if steps < 1:
            raise ValueError(
                f"strength {strength} x num_steps {n} leaves no denoising step: increase either"
            )
        return ts[n - steps :]

    def resolve_size(self, height, width) -> tuple[int, int]:
        """(height, width), defaults from default_size(); checked against size_factor."""
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        images.check_size(height, width, self.size_factor)
        return height, width

    def _latent_shape(self, batch, height, width):
        f = self.vae_scale_factor
        return (batch, height // f, width // f, self.latent_channels)

    @staticmethod
    def _check_array(x, shape, name):
        x = jnp.asarray(x, jnp.float32)
        if x.shape != tuple(shape):
            raise ValueError(f"{name} has shape {x.shape}; expected (B, h, w, C) = {tuple(shape)}")
        return x

    # ------------------------------------------------------------------ execution
    def _graph(self, name):
        if name not in self._split:
            module = self.denoiser if name == "denoiser" else getattr(self, name)
            self._split[name] = nnx.split(module)
        return self._split[name]

    def _mesh_for(self, batch: int):
        if self.mesh is not None:
            return self.mesh if batch % self.mesh.shape["data"] == 0 else None
        n = math.gcd(batch, jax.device_count())
        return None if n == 1 else sharding.make_mesh({"data": n}, devices=jax.devices()[:n])

    def _states(self, mesh):
        names = ["denoiser"] + (["vae"] if self.vae is not None else [])
        out = {}
        for name in names:
            state = self._graph(name)[1]
            if mesh is not None:
                key = (name, tuple(d.id for d in mesh.devices.flat))
                if key not in self._placed:
                    rep = NamedSharding(mesh, PartitionSpec())
                    self._placed[key] = jax.device_put(state, rep)
                state = self._placed[key]
            out[name] = state
        return out

    def _execute(self, setting: programs.Setting, inputs: dict, scale, rng, batch: int):
        """Run the compiled program with the batch split over the mesh's data axis."""
        mesh = self._mesh_for(batch)
        if mesh is not None:
            split = NamedSharding(mesh, PartitionSpec("data"))
            rep = NamedSharding(mesh, PartitionSpec())
            stacked = ("cond", "weights") if setting.composable else ()  # (K, B, ...) leaves

            def put(path, x):
                x = jnp.asarray(x)
                batched = x.ndim > 0 and x.shape[0] == batch and path[0].key not in stacked
                return jax.device_put(x, split if batched else rep)

            inputs = jax.tree_util.tree_map_with_path(put, inputs)
            scale, rng = jax.device_put((jnp.float32(scale), rng), rep)
        graphdefs = (self._graph("denoiser")[0], self._graph("vae")[0] if self.vae else None)
        return programs.generate_jit(setting, graphdefs, self._states(mesh), inputs, scale, rng)

    def _setting(self, method, options, ts, guided, guidance_rescale, **kw) -> programs.Setting:
        if kw.get("output", "image") not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {kw['output']!r}")
        vae = self.vae
        factors = (
            (1.0, 0.0)
            if vae is None
            else (float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0))
        )
        return programs.Setting(
            kind=self.kind, method=method, options=options, ts=tuple(float(t) for t in ts),
            schedule=self.scheduler.schedule, prediction_type=self.scheduler.prediction_type,
            guided=guided, rescale=float(guidance_rescale), vae_factors=factors,
            quantized=self.quantized, **kw,
        )  # fmt: skip

    @staticmethod
    def _keys(rng):
        """Fixed split of the caller's key: noise, image posterior, masked posterior, sampler."""
        rng = jax.random.key(0) if rng is None else rng
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        return jax.random.split(rng, 4)

    def _guided(self, guidance_scale):
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        return scale, scale > 1.0  # diffusers: classifier-free guidance only for scale > 1
