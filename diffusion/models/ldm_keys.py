"""Key maps between diffusers / transformers state dicts and the original Stable Diffusion
(LDM, Rombach et al. 2022; SDXL's sgm, Podell et al. 2023) checkpoint layout.

A single-file checkpoint (the A1111 / Civitai `.safetensors`) holds the U-Net under
`model.diffusion_model.`, the VAE under `first_stage_model.` and the text encoders under
`cond_stage_model.` / `conditioner.embedders.N.` with the original code's module names. Each map
here is built from the diffusers keys of one component (so it follows the component's actual
structure: blocks per level, which levels have attention) and sends every diffusers key to one
`Entry`: the original key (without the component prefix) plus how the tensor changes on the way:

    op ""     same tensor
    op "1x1"  diffusers Linear (O, I)  <->  original 1x1 Conv (O, I, 1, 1) (LDM VAE attention)
    op "T"    diffusers Linear (P, D)  <->  original matrix (D, P) applied as x @ W (OpenCLIP
              text_projection)
    op "qkv"  diffusers q/k/v projection (D, D) / (D,) <-> part `part` of the fused
              nn.MultiheadAttention in_proj (3D, D) / (3D,) (OpenCLIP), rows part*D:(part+1)*D

Kinds: "unet" (UNet2DConditionModel <-> openaimodel.UNetModel), "vae" (AutoencoderKL <->
ldm Encoder/Decoder), "clip" (transformers CLIPTextModel: same names, as in SD1's
FrozenCLIPEmbedder and SDXL's first embedder), "openclip" (CLIPTextModel[WithProjection] <->
open_clip's text tower: SD2's FrozenOpenCLIPEmbedder, SDXL's second embedder).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where a diffusers tensor lives in the original layout (key without component prefix)."""

    key: str
    op: str = ""  # "", "1x1", "T", "qkv"
    part: int = 0  # q, k, v = 0, 1, 2 of a fused in_proj (op "qkv")


class KeyMapError(KeyError):
    """A diffusers key the original layout has no place for (unsupported component option)."""


# ----------------------------------------------------------------------------- U-Net

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}  # fmt: skip
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.weight": "label_emb.weight",
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.+)")  # fmt: skip
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename(rest: str, table: dict[str, str]) -> str:
    """Rename the first dotted component of `rest` by `table` (a resnet's layer names)."""
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _count(keys: Iterable[str], pattern: str) -> dict[int, int]:
    """{block index: number of sub-layers} for keys matching `pattern` (groups: block, layer)."""
    out: dict[int, int] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            b, j = int(m.group(1)), int(m.group(2))
            out[b] = max(out.get(b, 0), j + 1)
    return out


def unet_map(keys: Iterable[str]) -> dict[str, Entry]:
    """diffusers UNet2DConditionModel keys -> original `model.diffusion_model.` entries.

    The original U-Net is a flat list of blocks: `input_blocks.0` is conv_in; down level b's
    layers j follow (`input_blocks.i.0` resnet, `.1` attention) and then its downsampler
    (`input_blocks.i.0.op`); `middle_block.0/1/2` are resnet, attention, resnet; up level b's
    layers j are `output_blocks.i` (`.0` resnet, `.1` attention) with the upsampler after the
    last layer's resnet (and attention, if the level has one)."""
    keys = list(keys)
    down = _count(keys, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    up = _count(keys, r"up_blocks\.(\d+)\.resnets\.(\d+)\.")
    up_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))}
    down_start = np.cumsum([1] + [down[b] + 1 for b in sorted(down)])  # first input_blocks index
    up_start = np.cumsum([0] + [up[b] for b in sorted(up)])
    out = {}
    for key in keys:
        out[key] = Entry(_unet_key(key, down, down_start, up, up_start, up_attn))
    return out


def _unet_key(key, down, down_start, up, up_start, up_attn) -> str:
    for ours, theirs in _UNET_TOP.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if m := _BLOCK.fullmatch(key):
        side, b, kind, j, rest = (
            m.group(1),
            int(m.group(2)),
            m.group(3),
            int(m.group(4)),
            m.group(5),
        )
        if side == "down_blocks":
            i = int(down_start[b]) + (down[b] if kind == "downsamplers" else j)
            if kind == "downsamplers":  # Downsample's conv is called `op`
                return f"input_blocks.{i}.0.op.{rest.removeprefix('conv.')}"
            return f"input_blocks.{i}.{0 if kind == 'resnets' else 1}.{_rename_resnet(kind, rest)}"
        last = int(up_start[b]) + up[b] - 1
        if kind == "upsamplers":
            return f"output_blocks.{last}.{2 if b in up_attn else 1}.{rest}"
        i = int(up_start[b]) + j
        return f"output_blocks.{i}.{0 if kind == 'resnets' else 1}.{_rename_resnet(kind, rest)}"
    if m := _MID.fullmatch(key):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        i = 2 * j if kind == "resnets" else 2 * j + 1
        return f"middle_block.{i}.{_rename_resnet(kind, rest)}"
    raise KeyMapError(f"U-Net key {key!r} has no place in the original LDM layout")


def _rename_resnet(kind: str, rest: str) -> str:
    return _rename(rest, _UNET_RESNET) if kind == "resnets" else rest


# ----------------------------------------------------------------------------- VAE

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\."
                        r"(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")  # fmt: skip
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def vae_map(keys: Iterable[str]) -> dict[str, Entry]:
    """diffusers AutoencoderKL keys -> original `first_stage_model.` entries. The decoder's
    levels are numbered from the lowest resolution in diffusers and from the highest in the
    original (`decoder.up.{n-1-i}`); mid-block attention uses 1x1 convolutions there."""
    keys = list(keys)
    n_up = len({m.group(1) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    return {key: _vae_entry(key, n_up) for key in keys}


def _vae_entry(key: str, n_up: int) -> Entry:
    key_ = key.replace(".conv_norm_out.", ".norm_out.")
    if m := _VAE_BLOCK.fullmatch(key_):
        part, _, b, kind, j, rest = m.groups()
        level = int(b) if part == "encoder" else n_up - 1 - int(b)
        side = "down" if part == "encoder" else "up"
        if kind == "resnets":
            rest = _rename(rest, _VAE_RESNET)
            return Entry(f"{part}.{side}.{level}.block.{j}.{rest}")
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return Entry(f"{part}.{side}.{level}.{sampler}.{rest}")
    if m := _VAE_MID.fullmatch(key_):
        part, kind, j, rest = m.groups()
        if kind == "resnets":
            return Entry(f"{part}.mid.block_{int(j) + 1}.{_rename(rest, _VAE_RESNET)}")
        head, _, tail = rest.partition(".")
        tail = tail.removeprefix("0.") if head == "to_out" else tail
        op = "1x1" if tail == "weight" and head != "group_norm" else ""
        return Entry(f"{part}.mid.attn_{int(j) + 1}.{_VAE_ATTN[head]}.{tail}", op)
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key_) or \
            re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key_):  # fmt: skip
        return Entry(key_)
    raise KeyMapError(f"VAE key {key!r} has no place in the original LDM layout")


# ----------------------------------------------------------------------------- text encoders

_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": Entry("token_embedding.weight"),
                 "text_model.embeddings.position_embedding.weight": Entry("positional_embedding"),
                 "text_model.final_layer_norm.weight": Entry("ln_final.weight"),
                 "text_model.final_layer_norm.bias": Entry("ln_final.bias"),
                 "text_projection.weight": Entry("text_projection", "T")}  # fmt: skip
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
_OPENCLIP_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def clip_map(keys: Iterable[str]) -> dict[str, Entry]:
    """transformers CLIPTextModel keys (with the `text_model.` prefix) -> the same names under
    `cond_stage_model.transformer.` (SD1) / `conditioner.embedders.0.transformer.` (SDXL)."""
    return {key: Entry(key) for key in keys}


def openclip_map(keys: Iterable[str]) -> dict[str, Entry]:
    """transformers CLIPTextModel[WithProjection] keys -> open_clip text-tower entries
    (`transformer.resblocks.i.*`, fused `attn.in_proj_weight`, `text_projection` as x @ W)."""
    out = {}
    for key in keys:
        if key in _OPENCLIP_TOP:
            out[key] = _OPENCLIP_TOP[key]
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise KeyMapError(f"text encoder key {key!r} has no place in the open_clip layout")
        i, rest = m.groups()
        if q := _OPENCLIP_QKV.fullmatch(rest):
            part = "qkv".index(q.group(1))
            out[key] = Entry(f"transformer.resblocks.{i}.attn.in_proj_{q.group(2)}", "qkv", part)
            continue
        for theirs, ours in _OPENCLIP_LAYER.items():
            if rest.startswith(theirs + "."):
                rest = ours + rest[len(theirs) :]
                break
        else:
            raise KeyMapError(f"text encoder key {key!r} has no place in the open_clip layout")
        out[key] = Entry(f"transformer.resblocks.{i}.{rest}")
    return out


KEY_MAPS = {"unet": unet_map, "vae": vae_map, "clip": clip_map, "openclip": openclip_map}


def key_map(kind: str, keys: Iterable[str]) -> dict[str, Entry]:
    """diffusers key -> Entry for a component kind (unet, vae, clip, openclip)."""
    if kind not in KEY_MAPS:
        raise ValueError(f"unknown component kind {kind!r}; known: {', '.join(KEY_MAPS)}")
    return KEY_MAPS[kind](keys)


# ----------------------------------------------------------------------------- tensors


def diffusers_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the diffusers tensor made from an original tensor of `shape`."""
    shape = tuple(shape)
    if entry.op == "1x1" and len(shape) == 4:
        return shape[:2]  # (O, I, 1, 1) -> (O, I)
    if entry.op == "T" and len(shape) == 2:
        return shape[::-1]
    if entry.op == "qkv" and shape and shape[0] % 3 == 0:
        return (shape[0] // 3, *shape[1:])
    return shape


def read(entry: Entry, tensor_slice) -> np.ndarray:
    """The diffusers tensor from a safetensors slice (`safe_open(...).get_slice(key)`): only
    the needed rows of a fused in_proj are read."""
    shape = tuple(tensor_slice.get_shape())
    if entry.op == "qkv":
        d = shape[0] // 3
        return np.asarray(tensor_slice[entry.part * d : (entry.part + 1) * d])
    array = np.asarray(tensor_slice[:]) if shape else np.asarray(tensor_slice[...])
    if entry.op == "1x1" and array.ndim == 4:
        return array.reshape(array.shape[:2])  # (O, I, 1, 1) -> (O, I)
    if entry.op == "T":
        return np.ascontiguousarray(array.T)  # (D, P) -> (P, D)
    return array


def original_shape(entries: list[Entry], shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the original tensor made from the diffusers tensors of `entries` (all with the
    same original key; q, k, v for a fused in_proj)."""
    op, shape = entries[0].op, tuple(shapes[0])
    if op == "qkv":
        return (sum(s[0] for s in shapes), *shape[1:])
    if op == "1x1":
        return (*shape, 1, 1)
    if op == "T":
        return shape[::-1]
    return shape


def to_original(entries: list[Entry], arrays: list[np.ndarray]) -> np.ndarray:
    """The original tensor from its diffusers tensors (inverse of `read`)."""
    op = entries[0].op
    if op == "qkv":
        order = np.argsort([e.part for e in entries])
        return np.concatenate([arrays[i] for i in order], axis=0)  # (3D, D) / (3D,)
    if op == "1x1":
        return arrays[0].reshape(*arrays[0].shape, 1, 1)  # (O, I) -> (O, I, 1, 1)
    if op == "T":
        return np.ascontiguousarray(arrays[0].T)
    return arrays[0]
