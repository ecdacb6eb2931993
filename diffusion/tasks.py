"""What a training run trains, chosen once from the config: a diffusion model or an autoencoder.

    task = tasks.from_config(cfg)            # DiffusionTask | AutoencoderTask
    model = task.build_model(nnx.Rngs(0))
    batch = task.prepare_batch(numpy_batch)  # host side: arrays the step needs
    loss, aux = task.loss(model, batch, rng) # device side: pure functions of (model, batch, rng)
    images = task.sample_grid(model, rng, example_batch)

A task holds typed pieces (model spec, schedule, objective, conditioning, sampling settings),
never the config; train.py only sees these methods.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import conditioning, images, losses, predictions, samplers, schedules
from diffusion.latent import LatentSpace
from diffusion.models import ModelSpec
from diffusion.samplers import guidance


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How sample grids are drawn during training (and by default in evaluations)."""

    method: str = "euler"
    num_steps: int = 30
    grid: str | None = None  # time grid name (None: the method's default)
    guidance_scale: float = 1.0
    clip_x0: tuple[float, float] | None = None  # clip x0_hat to the data range (clip_sample)
    num_images: int = 16
    every: int = 0  # steps between grids; 0: none
    prompts: tuple[str, ...] = ()  # captions of text-conditioned grids, repeated

    @classmethod
    def from_config(cls, s) -> Sampling:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in dict(s).items() if k in fields}
        unknown = sorted(set(dict(s)) - fields)
        if unknown:
            raise ValueError(f"unknown sample options {unknown}; valid: {sorted(fields)}")
        if kw.get("clip_x0") is not None:
            kw["clip_x0"] = tuple(kw["clip_x0"])
        kw["prompts"] = tuple(kw.get("prompts", ()))
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class DiffusionTask:
    """A denoiser trained with `objective` on `schedule`, conditioned by `conditioning`."""

    model: ModelSpec
    schedule: schedules.Schedule
    objective: losses.Objective
    conditioning: conditioning.Unconditional
    sampling: Sampling
    data_key: str = "image"
    latents: LatentSpace | None = None  # latent diffusion: the frozen VAE and its latent scale

    @property
    def grid_columns(self) -> int:
        return self.conditioning.grid_columns

    def dataset(self, data_cfg) -> tuple[str, str | None]:
        """(name, data_dir) the training pipeline reads: the dataset, or (latent diffusion)
        its latent cache, encoded once by the frozen VAE."""
        data_dir = data_cfg.get("data_dir") or None
        if self.latents is None:
            return data_cfg.name, data_dir
        return self.latents.cache(data_cfg.name, data_dir, data_cfg.get("image_size"))

    def to_pixels(self, x):
        """Samples as images in [-1, 1]: latents decoded by the frozen VAE."""
        return x if self.latents is None else self.latents.decode(x)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return self.conditioning.build(self.model, rngs)

    def prepare_batch(self, batch: dict) -> dict:
        """{"x": data (B, ...) float32, **condition arrays}; cached latents are scaled here."""
        if self.latents is not None:
            x = self.latents.scale(np.asarray(batch["latent"], np.float32))
        else:
            x = np.asarray(batch[self.data_key], np.float32)
        return {"x": x, **self.conditioning.prepare(batch)}

    def model_fn(self, model, x_t, model_time, cond):
        """Network prediction at (x_t, model_time (B,) or scalar) for condition `cond`."""
        t = jnp.broadcast_to(model_time, (x_t.shape[0],))
        kwargs = self.conditioning.kwargs(model, cond)
        return self.conditioning.denoiser(model)(x_t, timestep=t, **kwargs)

    def loss(self, model, batch, rng):
        cond = {k: v for k, v in batch.items() if k != "x"} or None
        fn = lambda x_t, mt, c: self.model_fn(model, x_t, mt, c)
        null = self.conditioning.null()
        return losses.diffusion_loss(self.objective, fn, batch["x"], rng, cond, null)

    def denoiser(self, model, cond, guidance_scale=1.0):
        """denoise_fn(x_t, t) -> x0_hat for the samplers; classifier-free guidance (one batched
        [uncond, cond] network call per evaluation) when cond is given. The condition is encoded
        once (text encoders run outside the sampling loop)."""
        s, ptype = self.schedule, self.objective.prediction_type
        net, encode = self.conditioning.denoiser(model), self.conditioning.kwargs

        def fn(x, model_time, kwargs):
            return net(x, timestep=jnp.broadcast_to(model_time, (x.shape[0],)), **kwargs)

        if cond is None:
            denoise = predictions.as_denoiser(lambda x, mt: fn(x, mt, {}), s, ptype)
        else:
            null = jax.tree.map(lambda n: n[None], self.conditioning.null())  # batch of 1
            kw, kw_null = encode(model, cond), encode(model, null)
            denoise = guidance.cfg_denoiser(fn, s, ptype, kw, kw_null, guidance_scale)
        if self.sampling.clip_x0 is not None:  # pixel data in [-1, 1]: diffusers' clip_sample
            lo, hi = self.sampling.clip_x0
            return lambda x, t: jnp.clip(denoise(x, t), lo, hi)
        return denoise

    def sample(self, model, rng, cond, shape, *, method, num_steps, guidance_scale=1.0, grid=None,
               x_T=None, **options):  # fmt: skip
        """Samples (shape) from x_T (default: drawn from the prior at t_max with rng), with the
        given sampler, grid and guidance; `options` go to samplers.sample (the method's options
        such as eta or order, and return_info)."""
        denoise = self.denoiser(model, cond, guidance_scale)
        if x_T is None:
            x_T = samplers.prior(self.schedule, jax.random.fold_in(rng, 0), shape)
        return samplers.sample(
            denoise,
            x_T,
            self.schedule,
            method=method,
            num_steps=num_steps,
            rng=jax.random.fold_in(rng, 1),
            grid=grid,
            **options,
        )

    def sample_grid(self, model, rng, example: dict):
        """The training-time sample grid: sampling.num_images samples, conditions from the
        conditioning (class column per class, prompts repeated)."""
        sc = self.sampling
        cond = self.conditioning.sample_conditions(sc.num_images, sc.prompts)
        shape = (sc.num_images, *example["x"].shape[1:])
        return self.sample(
            model,
            rng,
            cond,
            shape,
            method=sc.method,
            num_steps=sc.num_steps,
            guidance_scale=sc.guidance_scale,
            grid=sc.grid,
        )


@dataclasses.dataclass(frozen=True)
class AutoencoderTask:
    """AutoencoderKL: L1 reconstruction + kl_weight * KL per latent element (LDM's recipe, no
    perceptual or adversarial term)."""

    model: ModelSpec
    kl_weight: float
    sampling: Sampling
    data_key: str = "image"
    grid_columns = images.GRID_COLUMNS

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return self.model.build(rngs)

    def dataset(self, data_cfg) -> tuple[str, str | None]:
        return data_cfg.name, data_cfg.get("data_dir") or None

    def to_pixels(self, x):
        return x

    def prepare_batch(self, batch: dict) -> dict:
        return {"x": np.asarray(batch[self.data_key], np.float32)}

    def loss(self, model, batch, rng):
        x = batch["x"]
        posterior = model.encode(x)
        recon = model.decode(posterior.sample(rng))
        rec = jnp.mean(jnp.abs(recon.astype(jnp.float32) - x))
        kl = jnp.mean(posterior.kl()) / np.prod(x.shape[1:])
        loss = rec + self.kl_weight * np.prod(x.shape[1:]) * kl
        return loss, {"l1": rec, "kl": kl}

    def reconstruct(self, model, x):
        return model.decode(model.encode(x).mode())

    def sample_grid(self, model, rng, example: dict):
        """Rows of the first sampling.num_images examples above their reconstructions."""
        x = jnp.asarray(example["x"][: self.sampling.num_images])
        recon = self.reconstruct(model, x).astype(x.dtype)
        return images.paired_rows(x, recon, self.grid_columns)


def _diffusion(cfg) -> DiffusionTask:
    schedule = schedules.get(cfg.schedule.name, **dict(cfg.schedule.get("kwargs", {})))
    sampling = Sampling.from_config(cfg.sample)
    samplers.get(sampling.method)  # fail before training, listing valid samplers
    dtype = cfg.get("compute_dtype", "float32")
    latents = None
    if cfg.get("latents"):
        if not cfg.latents.get("vae"):
            raise ValueError(
                "latent diffusion needs its VAE: --config.latents.vae=PATH (a VAE training "
                "workdir, e.g. of configs/shapes_vae.py, or a diffusers AutoencoderKL folder)"
            )
        data_dir = cfg.data.get("data_dir") or None
        scale = cfg.latents.get("scaling_factor", "auto")
        latents = LatentSpace.load(cfg.latents.vae, scale, cfg.data.name, data_dir)
    return DiffusionTask(
        model=ModelSpec.from_config(cfg.model, dtype),
        schedule=schedule,
        objective=losses.Objective(schedule, **dict(cfg.objective)),
        conditioning=conditioning.from_config(cfg.get("conditioning"), dtype),
        sampling=sampling,
        data_key=cfg.data.get("key", "image"),
        latents=latents,
    )


def _autoencoder(cfg) -> AutoencoderTask:
    return AutoencoderTask(
        model=ModelSpec.from_config(cfg.model, cfg.get("compute_dtype", "float32")),
        kl_weight=cfg.get("kl_weight", 1e-6),
        sampling=Sampling.from_config(cfg.sample),
        data_key=cfg.data.get("key", "image"),
    )


def _finetune(cfg):
    from diffusion.adapters import finetune  # adapters build on this module

    return finetune.from_config(cfg)


def _controlnet(cfg):
    from diffusion.adapters import control

    return control.from_config(cfg)


TASKS = {"diffusion": _diffusion, "autoencoder": _autoencoder, "finetune": _finetune,
         "controlnet": _controlnet}  # fmt: skip


def from_config(cfg) -> DiffusionTask | AutoencoderTask:
    """The run's task, built once from its config (errors name the valid choices)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; valid: {sorted(TASKS)}")
    return TASKS[cfg.task](cfg)
