"""Prompt -> conditioning for SD 1/2, SDXL and SD3, as diffusers' `encode_prompt`s assemble it.

    SD 1/2  {"encoder_hidden_states": CLIP last_hidden_state (B, 77, D)}
            (clip_skip k: final_layer_norm(hidden_states[-(k + 1)]))
    SDXL    {"encoder_hidden_states": concat(CLIP-L, CLIP-G hidden_states[-2], -1) (B, 77, 2048),
             "text_embeds": CLIP-G text_embeds (B, 1280),
             "time_ids": original size + crop top-left + target size (B, 6)}
            negative prompt None with force_zeros_for_empty_prompt: all zeros
    SD3     {"encoder_hidden_states": concat(pad(concat(CLIP-L, CLIP-G hidden_states[-2], -1),
                                             to the T5 width), T5 last_hidden_state, axis=1)
             (B, 77 + max_sequence_length, 4096); zeros of T5's shape when there is no T5,
             "pooled_projections": concat(CLIP-L, CLIP-G text_embeds, -1) (B, 2048)}

(Podell et al. 2023, SDXL, sec. 2.2; Esser et al. 2024, SD3, sec. 5.2.) As in diffusers,
clip_skip applies to the prompt only, never to the negative prompt. Text encoders run as
compiled programs of their own (one per encoder and token shape), separate from generation.
Prompts longer than a tokenizer's limit are truncated with a warning (diffusers logs one).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.models import text


def as_prompts(prompt, num_images_per_prompt: int = 1) -> list[str]:
    """A list of prompts, each repeated num_images_per_prompt times (diffusers' order)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt!r}")
    return [p for p in prompts for _ in range(num_images_per_prompt)]


def as_negatives(negative, prompts: list[str], num_images_per_prompt: int = 1):
    """Negative prompts matching `prompts` (None stays None: the model's empty conditioning)."""
    if negative is None:
        return None
    if isinstance(negative, str):
        return [negative] * len(prompts)
    negatives = as_prompts(negative, num_images_per_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(
            f"negative_prompt has {len(negatives) // num_images_per_prompt} prompts, prompt has "
            f"{len(prompts) // num_images_per_prompt}: they must match (or pass one string)"
        )
    return negatives


def tokenize(tokenizer, prompts: list[str], max_length: int, component: str) -> np.ndarray:
    """(B, max_length) int32 ids padded to max_length; longer prompts truncated with a warning."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
    full = tokenizer(prompts).input_ids
    for p, f in zip(prompts, full):
        if len(f) > max_length:
            removed = tokenizer.decode(f[max_length - 1 : -1])
            warnings.warn(
                f"{component} handles sequences up to {max_length} tokens; this part of the "
                f"prompt {p[:40]!r}... was truncated: {removed!r}",
                stacklevel=3,
            )
    return np.asarray(ids, np.int32)


@nnx.jit(static_argnums=(2, 3))
def _clip(encoder, ids, layer, final_norm):
    """(hidden (B, L, D), pooled (B, P)): layer None = last_hidden_state, else
    hidden_states[layer] (final LayerNorm applied when final_norm)."""
    out = encoder(ids, output_hidden_states=True)
    if isinstance(encoder, text.CLIPTextModelWithProjection):
        pooled, last, states, norm = out[0], out[1], out[2], encoder.text_model.final_layer_norm
    else:
        last, pooled, states, norm = out[0], out[1], out[2], encoder.final_layer_norm
    if layer is None:
        return last, pooled
    hidden = states[layer]
    return (norm(hidden) if final_norm else hidden), pooled


@nnx.jit
def _t5(encoder, ids):
    return encoder(ids)[0]


def clip_encode(tokenizer, encoder, prompts, component, *, layer=None, final_norm=False,
                max_length=None):  # fmt: skip
    max_length = max_length or tokenizer.model_max_length
    return _clip(encoder, tokenize(tokenizer, prompts, max_length, component), layer, final_norm)


# ----------------------------------------------------------------------------- per family


def encode_sd(pipe, prompts: list[str], *, clip_skip: int | None = None) -> dict:
    """SD 1/2: CLIP last_hidden_state, or final_layer_norm(hidden_states[-(clip_skip + 1)])."""
    layer = None if not clip_skip else -(clip_skip + 1)
    hidden, _ = clip_encode(pipe.tokenizer, pipe.text_encoder, prompts, "tokenizer",
                            layer=layer, final_norm=True)  # fmt: skip
    return {"encoder_hidden_states": hidden}


def sdxl_time_ids(batch: int, original_size, crops_coords_top_left, target_size) -> jax.Array:
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): (B, 6)."""
    ids = [*original_size, *crops_coords_top_left, *target_size]
    if len(ids) != 6:
        raise ValueError(
            "original_size, crops_coords_top_left and target_size must be pairs, got "
            f"{original_size!r}, {crops_coords_top_left!r}, {target_size!r}"
        )
    return jnp.broadcast_to(jnp.asarray(ids, jnp.float32), (batch, 6))


def encode_sdxl(pipe, prompts: list[str], *, clip_skip: int | None = None) -> dict:
    """SDXL: both encoders' hidden_states[-(clip_skip or 0) - 2] concatenated; pooled from the
    last encoder (text_encoder_2's projection). time_ids are added by the caller."""
    pairs = [(pipe.tokenizer, pipe.text_encoder, "tokenizer"),
             (pipe.tokenizer_2, pipe.text_encoder_2, "tokenizer_2")]  # fmt: skip
    states, pooled = [], None
    for tok, enc, name in pairs:
        if enc is None:
            continue
        hidden, pooled = clip_encode(tok, enc, prompts, name, layer=-((clip_skip or 0) + 2))
        states.append(hidden)
    return {"encoder_hidden_states": jnp.concatenate(states, -1), "text_embeds": pooled}


def encode_sd3(pipe, prompts: list[str], *, clip_skip: int | None = None,
               max_sequence_length: int = 256) -> dict:  # fmt: skip
    """SD3: CLIP-L and CLIP-G penultimate states zero-padded to the T5 width and followed by
    T5's states along the sequence (zeros without T5); pooled = both CLIPs' projections."""
    joint = pipe.transformer.config.joint_attention_dim
    clip_len = pipe.tokenizer.model_max_length if pipe.tokenizer is not None else 77
    layer = -((clip_skip or 0) + 2)
    states, pooled = [], []
    for tok, enc, name in ((pipe.tokenizer, pipe.text_encoder, "tokenizer"),
                           (pipe.tokenizer_2, pipe.text_encoder_2, "tokenizer_2")):  # fmt: skip
        if enc is None:
            continue
        hidden, pool = clip_encode(tok, enc, prompts, name, layer=layer, max_length=clip_len)
        states.append(hidden)
        pooled.append(pool)
    if pipe.text_encoder_3 is None:
        t5 = jnp.zeros((len(prompts), max_sequence_length, joint), jnp.float32)
    else:
        ids = tokenize(pipe.tokenizer_3, prompts, max_sequence_length, "tokenizer_3")
        t5 = _t5(pipe.text_encoder_3, ids)
    clip_states = jnp.concatenate(states, -1)  # (B, 77, D_L + D_G)
    if clip_states.shape[-1] > t5.shape[-1]:
        raise ValueError(
            f"CLIP states width {clip_states.shape[-1]} exceeds the T5 / joint width {t5.shape[-1]}"
        )
    clip_states = jnp.pad(clip_states, ((0, 0), (0, 0), (0, t5.shape[-1] - clip_states.shape[-1])))
    return {
        "encoder_hidden_states": jnp.concatenate([clip_states, t5.astype(clip_states.dtype)], 1),
        "pooled_projections": jnp.concatenate(pooled, -1),
    }
