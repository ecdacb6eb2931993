"""What a training run trains: model construction, conditioning, loss and sampling per task.

Tasks: "diffusion" (any denoiser; optional class or text conditioning; text conditioning trains a
CLIP text encoder jointly with the denoiser) and "autoencoder" (AutoencoderKL: L1 reconstruction
plus a KL term). train.py only sees `Task` objects and pure functions of (params, batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion import losses, models, predictions, samplers, schedules
from diffusion.samplers import guidance

TASKS = ("diffusion", "autoencoder")
CONDITIONINGS = (None, "class", "text")


class TextConditioned(nnx.Module):
    """A denoiser (e.g. SD3Transformer) with a CLIP text encoder trained jointly."""

    def __init__(self, text_encoder: nnx.Module, denoiser: nnx.Module):
        self.text_encoder = text_encoder
        self.denoiser = denoiser


def _build(model_cfg, rngs, dtype):
    cls, config_cls = models.get_model(model_cfg["class_name"])
    d = {"_class_name": model_cfg["class_name"], **dict(model_cfg.get("config", {}))}
    config = config_cls.from_diffusers(d)
    if model_cfg.get("remat") and hasattr(config, "remat"):
        config = dataclasses.replace(config, remat=True)
    return cls(config, rngs=rngs, dtype=dtype, param_dtype=jnp.float32)


def build_model(cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    """The trainable module from cfg.model (diffusers-style config dicts), fp32 params."""
    dtype = jnp.dtype(cfg.get("compute_dtype", "float32"))
    model = _build(cfg.model, rngs, dtype)
    if cfg.get("conditioning") == "text":
        return TextConditioned(_build(cfg.text_encoder, rngs, dtype), model)
    return model


def word_tokenizer(vocab_words, max_length: int):
    """A word-level tokenizer (tokenizers library) with <pad>=0, <unk>, <bos>, <eos> and padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=max_length)
    tok.enable_truncation(max_length)
    return tok


@dataclasses.dataclass
class Task:
    """Host-side conditioning plus pure loss / sampling functions over a module."""

    cfg: Any
    schedule: Any = None
    objective: Any = None
    tokenizer: Any = None

    @classmethod
    def from_config(cls, cfg):
        if cfg.task not in TASKS:
            raise ValueError(f"unknown task {cfg.task!r}; valid: {list(TASKS)}")
        if cfg.get("conditioning") not in CONDITIONINGS:
            raise ValueError(
                f"unknown conditioning {cfg.conditioning!r}; valid: {list(CONDITIONINGS)}"
            )
        task = cls(cfg)
        if cfg.task == "diffusion":
            task.schedule = schedules.get(cfg.schedule.name, **dict(cfg.schedule.get("kwargs", {})))
            task.objective = losses.Objective(task.schedule, **dict(cfg.objective))
            samplers.get(cfg.sample.method)  # fail before training, listing valid samplers
        if cfg.get("conditioning") == "text":
            words = cfg.tokenizer.vocab.split()
            task.tokenizer = word_tokenizer(words, cfg.tokenizer.max_length)
        return task

    # ---- host side: batch -> arrays ------------------------------------------------------
    def tokenize(self, captions) -> np.ndarray:
        enc = self.tokenizer.encode_batch([str(c) for c in captions])
        return np.asarray([e.ids for e in enc], np.int32)  # (B, L)

    def prepare_batch(self, batch: dict) -> dict:
        """Keep the arrays the step needs; tokenize captions for text conditioning."""
        out = {"x": np.asarray(batch[self.cfg.data.get("key", "image")], np.float32)}
        if self.cfg.get("conditioning") == "class":
            out["label"] = np.asarray(batch["label"], np.int32)
        elif self.cfg.get("conditioning") == "text":
            out["tokens"] = self.tokenize(batch["caption"])
        return out

    def null_condition(self):
        if self.cfg.get("conditioning") == "class":
            return {"label": jnp.asarray(self.cfg.num_classes, jnp.int32)}  # extra "null" class
        if self.cfg.get("conditioning") == "text":
            return {"tokens": jnp.asarray(self.tokenize([""])[0])}
        return None

    # ---- device side: pure functions ---------------------------------------------------------
    def model_fn(self, model, x_t, model_time, cond):
        """Network prediction at (x_t, model_time (B,) or scalar) for condition `cond`."""
        t = jnp.broadcast_to(model_time, (x_t.shape[0],))
        kind = self.cfg.get("conditioning")
        if kind == "text":
            hidden, pooled = self._encode_text(model.text_encoder, cond["tokens"])
            return model.denoiser(x_t, hidden, pooled, t)
        if kind == "class":
            return model(x_t, t, class_labels=cond["label"])
        return model(x_t, t)

    def _encode_text(self, encoder, tokens):
        text_embeds, last_hidden = encoder(tokens)  # CLIPTextModelWithProjection
        return last_hidden, text_embeds

    def loss(self, model, batch, rng):
        if self.cfg.task == "autoencoder":
            return self._vae_loss(model, batch["x"], rng)
        cond = {k: v for k, v in batch.items() if k != "x"} or None
        fn = lambda x_t, mt, c: self.model_fn(model, x_t, mt, c)
        return losses.diffusion_loss(
            self.objective, fn, batch["x"], rng, cond, self.null_condition()
        )

    def _vae_loss(self, model, x, rng):
        posterior = model.encode(x)
        recon = model.decode(posterior.sample(rng))
        rec = jnp.mean(jnp.abs(recon.astype(jnp.float32) - x))
        kl = jnp.mean(posterior.kl()) / np.prod(x.shape[1:])
        loss = rec + self.cfg.get("kl_weight", 1e-6) * np.prod(x.shape[1:]) * kl
        return loss, {"l1": rec, "kl": kl}

    def sample(self, model, rng, cond, shape, *, method, num_steps, guidance_scale=1.0):
        """Images from noise (diffusion) or reconstructions (autoencoder: cond holds 'x')."""
        if self.cfg.task == "autoencoder":
            return model.decode(model.encode(cond["x"]).mode())
        s, ptype = self.schedule, self.objective.prediction_type
        fn = lambda x, mt, c: self.model_fn(model, x, mt, c)
        if cond is None:
            denoise = predictions.as_denoiser(lambda x, mt: fn(x, mt, None), s, ptype)
        else:  # classifier-free guidance: one batched [uncond, cond] network call per step
            null = jax.tree.map(lambda n: n[None], self.null_condition())
            denoise = guidance.cfg_denoiser(fn, s, ptype, cond, null, guidance_scale)
        if self.cfg.sample.get("clip_x0"):  # pixel data in [-1, 1]: as diffusers' clip_sample
            lo, hi = self.cfg.sample.clip_x0
            unclipped = denoise
            denoise = lambda x, t: jnp.clip(unclipped(x, t), lo, hi)
        x_T = samplers.prior(s, jax.random.fold_in(rng, 0), shape)
        return samplers.sample(
            denoise, x_T, s, method=method, num_steps=num_steps, rng=jax.random.fold_in(rng, 1)
        )
