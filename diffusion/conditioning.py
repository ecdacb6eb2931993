"""Conditioning, chosen once per run: a batch -> the model's diffusers-named keyword arguments.

    cond = conditioning.prepare(batch)        # host: {"class_labels": (B,)} / {"input_ids": (B, L)}
    kw = conditioning.kwargs(model, cond)     # device: {"class_labels": ...} or
                                              #   {"encoder_hidden_states": (B, L, D),
                                              #    "pooled_projections": (B, P)} (text)
    pred = conditioning.denoiser(model)(x_t, timestep=t, **kw)

so any model takes any conditioning: a class-conditional U-Net gets `class_labels=`, an SD1-style
U-Net `encoder_hidden_states=`, an SD3 MMDiT also `pooled_projections=`, an SDXL U-Net
`added_cond_kwargs={"text_embeds", "time_ids"}`. `null()` is the condition classifier-free
guidance drops to (no batch axis): the extra "null" class, the empty caption's tokens.

Text conditioning trains a text encoder (transformers CLIPTextModel[WithProjection]) jointly
with the denoiser: the trainable module is then `TextConditioned(text_encoder, denoiser)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.data import tokenizer as tokenizers
from diffusion.models import ModelSpec

POOLED_AS = (None, "pooled_projections", "added_cond_kwargs")


class TextConditioned(nnx.Module):
    """A denoiser (U-Net or MMDiT) with the text encoder(s) trained jointly with it."""

    def __init__(self, text_encoder: nnx.Module, denoiser: nnx.Module, text_encoder_2=None):
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.text_encoder_2 = text_encoder_2


@dataclasses.dataclass(frozen=True)
class Unconditional:
    name = "none"
    grid_columns = 8

    def build(self, denoiser: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
        return denoiser.build(rngs)

    def prepare(self, batch: dict) -> dict:
        return {}

    def null(self):
        return None

    def kwargs(self, model, cond) -> dict:
        return {}

    def denoiser(self, model):
        return model

    def sample_conditions(self, n: int, prompts=()):
        return None


@dataclasses.dataclass(frozen=True)
class ClassLabels(Unconditional):
    """Class labels 0..num_classes-1; label num_classes is the "null" class for guidance
    (the model needs num_classes + 1 class embeddings)."""

    num_classes: int = 10
    name = "class"

    @property
    def grid_columns(self) -> int:  # a sample grid's column is its class
        return self.num_classes

    def prepare(self, batch: dict) -> dict:
        return {"class_labels": np.asarray(batch["label"], np.int32)}

    def null(self):
        return {"class_labels": jnp.asarray(self.num_classes, jnp.int32)}

    def kwargs(self, model, cond) -> dict:
        return {} if cond is None else {"class_labels": cond["class_labels"]}

    def sample_conditions(self, n: int, prompts=()):
        return {"class_labels": jnp.arange(n, dtype=jnp.int32) % self.num_classes}


@dataclasses.dataclass(frozen=True)
class Text(Unconditional):
    """Captions through one or two text encoders trained with the denoiser.

    hidden_state: which token states become encoder_hidden_states: -1 the final (layer-normed)
    states, -2 the penultimate layer's (SDXL / SD3 / SD2 "clip skip"). pooled_as: where the
    pooled embedding goes: None (nowhere; SD1), "pooled_projections" (SD3), "added_cond_kwargs"
    (SDXL, with time_ids (H, W, 0, 0, H, W) for image_size). A CLIPTextModelWithProjection
    pools through its projection (text_embeds), a CLIPTextModel gives pooler_output.
    With encoder_2 (SDXL / SD3 layouts, as diffusers assembles prompts): both encoders' token
    states are concatenated along features; the pooled embedding is encoder_2's (SDXL) or both
    concatenated (SD3); context_dim > 0 zero-pads the states' features to it and null_tokens
    appends that many all-zero tokens (SD3's stand-in for an absent T5 encoder).
    """

    tokenizer: tokenizers.Tokenizer = None
    encoder: ModelSpec = None
    encoder_2: ModelSpec | None = None
    hidden_state: int = -1
    pooled_as: str | None = "pooled_projections"
    image_size: int = 0
    context_dim: int = 0
    null_tokens: int = 0
    name = "text"

    def __post_init__(self):
        if self.pooled_as not in POOLED_AS:
            raise ValueError(f"unknown pooled_as {self.pooled_as!r}; valid: {list(POOLED_AS)}")
        if self.hidden_state not in (-1, -2):
            raise ValueError(f"hidden_state must be -1 or -2, got {self.hidden_state}")

    def build(self, denoiser: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
        net = denoiser.build(rngs)  # first: the RNG stream order fixes the initial weights
        enc = self.encoder.build(rngs)
        enc_2 = None if self.encoder_2 is None else self.encoder_2.build(rngs)
        return TextConditioned(enc, net, enc_2)

    def prepare(self, batch: dict) -> dict:
        return {"input_ids": self.tokenizer(batch["caption"])}

    def null(self):
        return {"input_ids": jnp.asarray(self.tokenizer([""])[0])}

    def denoiser(self, model):
        return model.denoiser

    def _encode(self, encoder, spec: ModelSpec, ids):
        """(token states (B, L, D), pooled (B, P)) of one encoder."""
        out = encoder(ids, output_hidden_states=self.hidden_state != -1)
        projected = spec.class_name == "CLIPTextModelWithProjection"
        pooled, last = (out[0], out[1]) if projected else (out[1], out[0])
        return (last if self.hidden_state == -1 else out[2][self.hidden_state]), pooled

    def kwargs(self, model, cond) -> dict:
        ids = cond["input_ids"]  # (B, L)
        states, pooled = self._encode(model.text_encoder, self.encoder, ids)
        if self.encoder_2 is not None:
            states_2, pooled_2 = self._encode(model.text_encoder_2, self.encoder_2, ids)
            states = jnp.concatenate([states, states_2], axis=-1)  # (B, L, D1 + D2)
            sd3 = self.pooled_as == "pooled_projections"
            pooled = jnp.concatenate([pooled, pooled_2], -1) if sd3 else pooled_2  # (B, P)
        if self.context_dim:
            pad = self.context_dim - states.shape[-1]
            states = jnp.pad(states, ((0, 0), (0, 0), (0, pad)))  # (B, L, context_dim)
        if self.null_tokens:
            zeros = jnp.zeros((states.shape[0], self.null_tokens, states.shape[-1]), states.dtype)
            states = jnp.concatenate([states, zeros], axis=1)  # (B, L + null_tokens, D)
        kw: dict[str, Any] = {"encoder_hidden_states": states}
        if self.pooled_as == "pooled_projections":
            kw["pooled_projections"] = pooled
        elif self.pooled_as == "added_cond_kwargs":
            s = self.image_size
            time_ids = jnp.broadcast_to(jnp.asarray([s, s, 0, 0, s, s], jnp.float32), (len(ids), 6))
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kw

    def sample_conditions(self, n: int, prompts=()):
        if not prompts:
            raise ValueError("text conditioning samples need prompts (sample.prompts)")
        return {"input_ids": jnp.asarray(self.tokenizer((list(prompts) * n)[:n]))}


CONDITIONINGS = ("none", "class", "text")


def from_config(section, compute_dtype="float32"):
    """The run's conditioning from its config section {"name": "none" | "class" | "text", ...}."""
    name = section.get("name", "none") if section is not None else "none"
    if name == "none":
        return Unconditional()
    if name == "class":
        return ClassLabels(int(section["num_classes"]))
    if name == "text":
        encoder_2 = section.get("text_encoder_2")
        return Text(
            tokenizer=tokenizers.from_config(section["tokenizer"]),
            encoder=ModelSpec.from_config(section["text_encoder"], compute_dtype),
            encoder_2=None
            if encoder_2 is None
            else ModelSpec.from_config(encoder_2, compute_dtype),
            hidden_state=section.get("hidden_state", -1),
            pooled_as=section.get("pooled_as", "pooled_projections"),
            image_size=section.get("image_size", 0),
            context_dim=section.get("context_dim", 0),
            null_tokens=section.get("null_tokens", 0),
        )
    raise ValueError(f"unknown conditioning {name!r}; valid: {list(CONDITIONINGS)}")
