"""Fine-tuning a pretrained text-to-image model: LoRA or full, optionally DreamBooth.

    task = finetune.from_config(cfg)     # cfg.task = "finetune"; run with diffusion.train

The base is a training workdir or a pipeline folder (base.py). `method="lora"` injects adapters
(lora.py) into the U-Net (and the text encoder if it has targets) and trains only them
(`trainable = LoRAParam`: the optimizer and checkpoints hold the adapters; the base weights
are the frozen pretrained ones, train_state.py); `method="full"` trains the U-Net's (and
optionally the text encoder's) weights, starting from the base's.

The data are a concept's images (concepts.py: "new_color" or the DreamBooth "subject"), VAE-
encoded once into a tfds dataset. DreamBooth (Ruiz et al. 2023, eq. 2) adds the
prior-preservation term: `prior.num_images` class images that the base model generates from
the class prompts (the instance captions without the rare token) pair up with the instance
images, and each step minimises

    L = E ||eps_hat(x_t, c_inst) - eps||^2 + prior.weight * E ||eps_hat(x'_t, c_cls) - eps'||^2

over B instance and B class examples in one network call (diffusers' train_dreambooth.py).
For a concept a class prompt cannot name without it (a new colour: configs/shapes_lora.py:prior)
`prior.prompts="ordinary"` makes the prior the base's samples of ordinary training captions, and
"real" ordinary generator images with their captions (a regularisation set, as kohya's).
Class latents are kept as the sampler returns them (diffusers decodes them to images and
re-encodes; the VAE round trip is skipped here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import data, losses, tasks
from diffusion.adapters import base, concepts, lora

# LoRA file component (diffusers' name: "unet" for a U-Net, "transformer" for an MMDiT) ->
# model attribute
COMPONENTS = {"unet": "denoiser", "transformer": "denoiser", "text_encoder": "text_encoder"}


PRIOR_PROMPTS = ("class", "ordinary", "real")  # finetune.prior.prompts (Prior)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    rank: int = 4
    alpha: float | None = None  # None: = rank
    dropout: float = 0.0
    targets: tuple[tuple[str, tuple[str, ...]], ...] = (("unet", ("to_q", "to_k", "to_v",
                                                                   "to_out.0")),)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Concept:
    kind: str = "new_color"  # concepts.examples kind
    num_images: int = 512
    seed: int = 0
    image_size: int | None = None  # resize the 32 px generator images (None: keep)


@dataclasses.dataclass(frozen=True)
class Prior:
    """DreamBooth prior preservation; num_images 0 turns it off. `prompts`: "class" (the base's
    samples of the concept captions without the rare token, DreamBooth), "ordinary" (the base's
    samples of ordinary generator captions) or "real" (ordinary generator images themselves)."""

    num_images: int = 0
    prompts: str = "class"
    weight: float = 1.0
    method: str = "dpmpp_2m"
    num_steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 1


@dataclasses.dataclass(frozen=True)
class FineTuneTask(tasks.DiffusionTask):
    """A DiffusionTask started from `base_path`, training LoRA adapters or the U-Net."""

    base_path: str = ""
    base_step: int | None = None
    method: str = "lora"
    lora: LoRASpec = LoRASpec()
    train_text_encoder: bool = False
    concept: Concept = Concept()
    prior: Prior = Prior()

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError(f"finetune.method must be 'lora' or 'full', got {self.method!r}")
        unknown = [c for c, _ in self.lora.targets if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"LoRA targets for {unknown}; components: {sorted(COMPONENTS)}")
        if self.prior.prompts not in PRIOR_PROMPTS:
            raise ValueError(f"finetune.prior.prompts={self.prior.prompts!r}; valid: "
                             f"{list(PRIOR_PROMPTS)}")  # fmt: skip
        if {"unet", "transformer"} <= {c for c, _ in self.lora.targets}:
            raise ValueError(
                "LoRA targets name both 'unet' and 'transformer' (one denoiser): "
                "use 'unet' for a U-Net base, 'transformer' for an MMDiT base"
            )

    # ---- model
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        model = super().build_model(rngs)
        if self.method == "lora":
            s = self.lora
            for component, targets in s.targets:
                lora.inject(getattr(model, COMPONENTS[component]), list(targets), rank=s.rank,
                            alpha=s.alpha, dropout=s.dropout, rngs=rngs)  # fmt: skip
        return model

    @property
    def trainable(self):
        if self.method == "lora":
            return lora.LoRAParam
        if self.train_text_encoder:
            return nnx.Param
        return nnx.All(nnx.Param, nnx.PathContains("denoiser"))

    def base(self):
        return base.load_base(self.base_path, self.base_step, self.sampling)

    def pretrained(self) -> dict:
        return base.flat_params(self.base()[1])

    # ---- data
    def dataset(self, data_cfg) -> tuple[str, str]:
        """The concept's (and class images') latents as a tfds dataset, written once."""
        out = os.path.join(data.default_data_dir(data_cfg.get("data_dir") or None),
                           "finetune_caches")  # fmt: skip
        n = self._num_records(data_cfg.batch_size)
        name = f"finetune_{self._digest()}_{n}"
        if not os.path.isdir(os.path.join(out, name)):
            _write(self, name, out, n)
        return name, out

    def _num_records(self, batch_size: int) -> int:
        """Instance images (and class images) repeat up to the largest batch the run draws:
        a training batch or the sample grid's (train.py reads one of sampling.num_images)."""
        n = max(self.concept.num_images, self.prior.num_images)
        return max(n, batch_size, self.sampling.num_images)

    def _digest(self) -> str:
        spec = [dataclasses.asdict(self.concept), dataclasses.asdict(self.prior)]
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        h.update(self.latents.fingerprint().encode())
        if self.prior.num_images:  # class images come from the base denoiser
            for leaf in jax.tree.leaves(nnx.state(self.base()[1].denoiser, nnx.Param)):
                h.update(np.asarray(leaf).tobytes())
        return h.hexdigest()[:12]

    def prepare_batch(self, batch: dict) -> dict:
        """{"x", "input_ids"}: instance examples, then (DreamBooth) as many class examples,
        with per-example loss weights 1 / prior.weight."""
        x = self.latents.scale(np.asarray(batch["latent"], np.float32))
        ids = self.conditioning.tokenizer(list(batch["caption"]))
        if not self.prior.num_images:
            return {"x": x, "input_ids": np.asarray(ids)}
        prior_x = self.latents.scale(np.asarray(batch["prior_latent"], np.float32))
        prior_ids = self.conditioning.tokenizer(list(batch["prior_caption"]))
        n = len(x)
        weight = np.concatenate([np.ones(n), np.full(n, self.prior.weight)]).astype(np.float32)
        return {"x": np.concatenate([x, prior_x]),  # (2B, h, w, c)
                "input_ids": np.concatenate([ids, prior_ids]), "weight": weight}  # fmt: skip

    def loss(self, model, batch, rng):
        drop_rng, rng = jax.random.split(rng)
        lora.training(model, drop_rng)  # adapter dropout, if any
        cond = {"input_ids": batch["input_ids"]}
        fn = lambda x_t, mt, c: self.model_fn(model, x_t, mt, c)
        null = self.conditioning.null()
        weight = batch.get("weight")
        loss, aux = losses.diffusion_loss(self.objective, fn, batch["x"], rng, cond, null, weight)
        # mean over [instance; class] halves of w * l = (L_instance + weight * L_class) / 2
        return (loss if weight is None else 2.0 * loss), aux


def _sample_latents(task: FineTuneTask, prompts: list[str], shape, batch: int = 16):
    """Unscaled latents the base model samples for `prompts` (class images)."""
    base_task, model = task.base()
    p = task.prior
    graphdef, params = nnx.split(model)
    ids = np.asarray(base_task.conditioning.tokenizer(prompts))

    @jax.jit
    def fn(params, ids, key):
        return base_task.sample(nnx.merge(graphdef, params), key, {"input_ids": ids},
                                (ids.shape[0], *shape), method=p.method, num_steps=p.num_steps,
                                guidance_scale=p.guidance_scale)  # fmt: skip

    out = []
    for i in range(0, len(prompts), batch):
        chunk = ids[i : i + batch]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])  # one shape
        z = fn(params, jnp.asarray(pad), jax.random.key(p.seed * 100003 + i))
        out.append(np.asarray(z)[: len(chunk)])
    z = np.concatenate(out)
    return z / task.latents.scaling_factor + task.latents.shift_factor


def _write(task: FineTuneTask, name: str, out: str, n: int) -> None:
    """Encode the concept images, and the prior's latents (sampled from the base, or encoded
    ordinary images for prompts "real"), into dataset `name`."""
    import tensorflow_datasets as tfds

    from diffusion.data.builders import resize_uint8
    from diffusion.data.latents import LatentCache

    c, p = task.concept, task.prior

    def encode(images):
        if c.image_size:
            images = np.stack([resize_uint8(im, c.image_size) for im in images])
        return task.latents.encode_unscaled(images.astype(np.float32) / 127.5 - 1.0)

    images, captions = concepts.examples(c.kind, c.num_images, c.seed)
    latents = encode(images)
    features = {"latent": tfds.features.Tensor(shape=latents.shape[1:], dtype=np.float32),
                "caption": tfds.features.Text()}  # fmt: skip
    if p.num_images:
        kind = c.kind if p.prompts == "class" else "ordinary"
        prior_images, prior_captions = concepts.examples(kind, p.num_images, p.seed + 1000)
        if p.prompts == "class":
            prior_captions = [concepts.class_prompt(t) for t in prior_captions]
        if p.prompts == "real":
            prior = encode(prior_images)
        else:
            prior = _sample_latents(task, prior_captions, latents.shape[1:])
        features |= {"prior_latent": features["latent"], "prior_caption": tfds.features.Text()}

    def generate():
        for i in range(n):
            ex = {"latent": latents[i % len(latents)], "caption": captions[i % len(latents)]}
            if p.num_images:
                j = i % p.num_images
                ex |= {"prior_latent": prior[j], "prior_caption": prior_captions[j]}
            yield i, ex

    builder = LatentCache(cache_name=name, features=features, split_examples={"train": generate},
                          data_dir=out, file_format="array_record")  # fmt: skip
    builder.download_and_prepare(file_format="array_record")


def _targets(section) -> tuple:
    return tuple((c, tuple(section[c])) for c in COMPONENTS if section.get(c))


def from_config(cfg) -> FineTuneTask:
    """The fine-tuning task of a config with task="finetune" (see configs/shapes_lora.py)."""
    f = cfg.finetune
    lo = f.get("lora", {})
    spec = LoRASpec(
        rank=lo.get("rank", 4),
        alpha=lo.get("alpha"),
        dropout=lo.get("dropout", 0.0),
        targets=_targets(lo.get("targets", {"unet": LoRASpec.targets[0][1]})),
    )
    return FineTuneTask(
        **base.task_fields(cfg, "finetune"), method=f.get("method", "lora"),
        lora=spec, train_text_encoder=f.get("train_text_encoder", False),
        concept=Concept(**dict(f.concept)), prior=Prior(**dict(f.get("prior", {}))),
    )  # fmt: skip


def export_lora(workdir: str, out: str, step: int | None = None) -> str:
    """The EMA adapters of a LoRA fine-tuning run as a diffusers LoRA file (save_lora)."""
    from diffusion.adapters import files
    from diffusion.train_state import restore_ema
    from diffusion.workdir import read_config

    cfg = read_config(workdir)
    task = tasks.from_config(cfg)
    if not isinstance(task, FineTuneTask) or task.method != "lora":
        raise ValueError(f"{workdir} is not a LoRA fine-tuning run")
    model, _ = restore_ema(cfg, task, workdir, step)
    comps = {c: getattr(model, COMPONENTS[c]) for c, _ in task.lora.targets}
    return files.save_lora(out, comps, lora.DEFAULT_ADAPTER)
