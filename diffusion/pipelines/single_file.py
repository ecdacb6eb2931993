"""Single-file (A1111 / Civitai, original LDM layout) Stable Diffusion checkpoints -> pipelines.

    pipe = pipelines.load_single_file("model.safetensors", config="sd15-folder")
    pipe = pipelines.load_single_file("v1-5.safetensors", tokenizer="clip-tokenizer-folder")
    pipe = pipelines.load_single_file("model.safetensors", config=..., vae="vae-ft-mse.safetensors")

The architecture is detected from the keys (single_file_layout.py); `config` (a diffusers
pipeline folder, with or without weights, or an architecture name: sd1, sd2, sdxl) supplies the
component configs, tokenizers and scheduler, as diffusers' `from_single_file(path, config=...)`;
the weights always come from the file. Without `config` the built-in configs of the published
models are used (the file must have their shapes) with the CLIP tokenizer folder `tokenizer`.
Each network is built abstractly and filled tensor by tensor through the key maps of
diffusion/models/ldm_keys.py, straight from the safetensors file (no second copy of the
checkpoint is made; a fused in_proj is read one q/k/v slice at a time).

Pickled `.ckpt` files are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax.numpy as jnp

from diffusion import models
from diffusion.models import convert, ldm_keys
from diffusion.models.presets import class_name
from diffusion.pipelines import loading, schedulers
from diffusion.pipelines import single_file_layout as layout
from diffusion.pipelines.single_file_config import preflight, resolve
from diffusion.pipelines.single_file_layout import SingleFileError

_PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_MAX_LISTED = 6


# ----------------------------------------------------------------------------- the file


def open_checkpoint(path: str):
    """safe_open handle of a .safetensors file; pickles and unreadable files raise."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise SingleFileError(f"{path} is not a file")
    with open(path, "rb") as f:
        head = f.read(10)
    # safetensors: 8-byte header length, then a JSON object; torch.save: a zip (PK) archive or,
    # in the legacy format, a pickle stream (protocol >= 2 starts with 0x80).
    pickled = head[8:10] != b'{"' and (head[:2] == b"PK" or head[:1] == b"\x80")
    if path.lower().endswith(_PICKLE_EXTENSIONS) or pickled:
        raise SingleFileError(
            f"{path} is a pickled PyTorch checkpoint: loading a pickle executes code stored in the "
            "file, so it is refused. Convert it to .safetensors with a trusted tool on a trusted "
            "machine (e.g. torch.load(weights_only=True) + safetensors.torch.save_file), or "
            "download the .safetensors version"
        )
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # safetensors' SafetensorError
        raise SingleFileError(f"cannot read {path}: {e} (truncated or corrupt download?)") from e


@dataclasses.dataclass
class _Mapped:
    """A tensor of the file in the diffusers layout, read only when converted (np.asarray)."""

    handle: object
    key: str  # key in the file
    entry: ldm_keys.Entry
    shape: tuple

    def __array__(self, dtype=None, copy=None):
        array = ldm_keys.read(self.entry, self.handle.get_slice(self.key))
        return array if dtype is None else array.astype(dtype)


@dataclasses.dataclass
class Plan:
    """One component's diffusers key -> file tensor, plus what the file has that it ignores."""

    sources: dict
    used: set
    problems: list


def plan_component(handle, keys, prefix: str, kind: str, model, *, extract_ema=False) -> Plan:
    """Map every parameter of `model` (abstract) to a tensor of the file and check its shape.

    kind: an ldm_keys map (unet, vae, clip, openclip) or "diffusers" (same names)."""
    want = convert.abstract_torch_state_dict(model)  # diffusers key -> (shape, dtype)
    keyset = set(keys)
    entries = ldm_keys.clip_map(want) if kind == "diffusers" else ldm_keys.key_map(kind, want)
    sources, used, problems = {}, set(), []
    for key, entry in entries.items():
        file_key = prefix + entry.key
        if extract_ema and kind == "unet":
            file_key = layout.ema_key(file_key)
        shape = tuple(want[key][0])
        if file_key not in keyset:
            problems.append(f"missing:    {file_key} ({key}, config shape {shape})")
            continue
        used.add(file_key)
        got = ldm_keys.diffusers_shape(entry, handle.get_slice(file_key).get_shape())
        if got != shape:
            problems.append(
                f"mis-shaped: {file_key} ({key}): file {got} vs config {shape} (torch layout)"
            )
            continue
        sources[key] = _Mapped(handle, file_key, entry, got)
    if kind == "openclip":
        used |= _openclip_extras(keys, prefix, model)
    return Plan(sources, used, problems)


def _openclip_extras(keys, prefix, model) -> set:
    """OpenCLIP tensors diffusers' text encoder does not use (as in diffusers' conversion): SD2's
    last block (it conditions on the penultimate layer, so the 24-block tower is stored with 23
    layers) and, for a text encoder without projection, the text_projection."""
    blocks = {int(k[len(prefix) :].split(".")[2]) for k in keys
              if k.startswith(prefix + "transformer.resblocks.")}  # fmt: skip
    n = model.config.num_hidden_layers
    extra = set()
    if blocks and max(blocks) == n:  # exactly one more block than the config's layers
        extra |= {k for k in keys if k.startswith(f"{prefix}transformer.resblocks.{n}.")}
    if not hasattr(model, "text_projection"):
        extra.add(prefix + "text_projection")
    return extra


def _raise(file: str, problems: list[str], hint: str = "") -> None:
    """One error listing up to _MAX_LISTED problems of each component ("[unet] ...")."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        groups.setdefault(p.split("]")[0] if p.startswith("[") else "", []).append(p)
    shown = []
    for group in groups.values():
        shown += group[:_MAX_LISTED]
        if len(group) > _MAX_LISTED:
            shown.append(f"... and {len(group) - _MAX_LISTED} more like these")
    raise SingleFileError(
        f"{file} does not fit the config ({len(problems)} problems):\n  "
        + "\n  ".join(shown)
        + (f"\n{hint}" if hint else "")
    )


def build(config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """The abstract module of a diffusers / transformers config.json dict."""
    cls, config_cls = models.get_model(class_name(config))
    return models.build_abstract(
        cls, config_cls.from_diffusers(config), dtype=dtype, param_dtype=param_dtype
    )


def fill(model, plan: Plan) -> None:
    """Copy the planned tensors into the module, one at a time (cast to its param dtype)."""
    convert.load_torch_state_dict(model, plan.sources, strict=True)


# ----------------------------------------------------------------------------- loading


def load_vae(path: str, config: dict | None = None, *, dtype=jnp.float32,
             param_dtype=jnp.float32):  # fmt: skip
    """A VAE to swap in: a diffusers AutoencoderKL folder (config.json + weights), or a single
    .safetensors file in the original layout (`encoder.down.0.block...`, optionally under
    `first_stage_model.` / `vae.`: e.g. vae-ft-mse-840000-ema-pruned.safetensors, or a full
    checkpoint's VAE) or the diffusers layout; a file takes `config` (the pipeline's VAE
    config.json dict: architecture and scaling factor)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model_index.json")):
            path = os.path.join(path, "vae")  # a pipeline folder: its VAE
        return loading.load_network(os.path.dirname(path) or ".", os.path.basename(path),
                                    dtype=dtype, param_dtype=param_dtype)  # fmt: skip
    if config is None:
        raise SingleFileError(f"a VAE file ({path}) needs the VAE config of the pipeline")
    handle = open_checkpoint(path)
    keys = [k for k in handle.keys() if not layout.NOT_WEIGHTS.fullmatch(k)]  # noqa: SIM118
    prefix = next((p for p in (layout.VAE, "vae.") if any(k.startswith(p) for k in keys)), "")
    ours = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    kind = "vae" if any(k.startswith("encoder.down.") for k in ours) else "diffusers"
    if not any(k.startswith(("encoder.", "decoder.")) for k in ours):
        raise SingleFileError(f"{path} holds no VAE (no encoder.* / decoder.* tensors)")
    model = build(config, dtype=dtype, param_dtype=param_dtype)
    plan = plan_component(handle, keys, prefix, kind, model)
    if plan.problems:
        _raise(path, plan.problems)
    fill(model, plan)
    return model


def _check_leftovers(path, keys, det, used, skipped_prefixes):
    """Tensors under a component's prefix that nothing used are errors (the config has fewer
    layers than the file); tensors outside every component are reported in a warning."""
    prefixes = [c.prefix for c in det.arch.components if c.prefix not in skipped_prefixes]
    inside, outside = [], []
    for k in keys:
        if k in used or layout.NOT_WEIGHTS.fullmatch(k) or k.startswith(layout.EMA_PREFIX):
            continue
        if any(k.startswith(p) for p in skipped_prefixes):
            continue
        (inside if any(k.startswith(p) for p in prefixes) else outside).append(k)
    if outside:
        warnings.warn(f"{path}: ignored {len(outside)} tensors outside the {det.arch.name} "
                      f"components, e.g. {outside[:3]}", stacklevel=3)  # fmt: skip
    return [f"unexpected: {k} (not in the config's model)" for k in inside]


def load_components(handle, path, det, res, *, vae=None, extract_ema=False, dtype=jnp.float32,
                    param_dtype=jnp.float32):  # fmt: skip
    """{component: module} for the file's networks (VAE from `vae` when given)."""
    keys = list(handle.keys())
    if extract_ema and not det.has_ema:
        raise SingleFileError(f"extract_ema=True but {path} has no EMA copy (model_ema.*)")
    # With extract_ema the U-Net's non-EMA weights are deliberately left unused.
    modules, plans, problems, used = {}, {}, [], set()
    skipped = [layout.UNET] if extract_ema else []
    for comp in det.arch.components:
        if comp.name == "vae" and vae is not None:
            skipped.append(comp.prefix)
            continue
        if not any(k.startswith(comp.prefix) for k in keys):
            hint = " (pass vae=...)" if comp.name == "vae" else ""
            raise SingleFileError(f"{path} has no {comp.name} ({comp.prefix}*){hint}")
        model = build(res.configs[comp.name], dtype=dtype, param_dtype=param_dtype)
        plan = plan_component(handle, keys, comp.prefix, comp.kind, model, extract_ema=extract_ema)
        modules[comp.name], plans[comp.name] = model, plan
        problems += [f"[{comp.name}] {p}" for p in plan.problems]
        used |= plan.used
    problems += _check_leftovers(path, keys, det, used, skipped)
    if problems:
        hint = (f"The built-in {det.arch.name} configs are the published model's: for other "
                "shapes pass config=<diffusers folder>") if res.builtin else ""  # fmt: skip
        _raise(path, problems, hint)
    for name, model in modules.items():
        fill(model, plans[name])
    if vae is not None:
        modules["vae"] = load_vae(vae, res.configs.get("vae"), dtype=dtype, param_dtype=param_dtype)
    return modules


def load_single_file(
    path: str, *, config=None, tokenizer: str | None = None, vae: str | None = None,
    extract_ema: bool = False, prediction_type: str | None = None, dtype=jnp.float32,
    param_dtype=jnp.float32, mesh=None,
):  # fmt: skip
    """The pipeline object `pipelines.load` returns, from a single-file checkpoint.

    config: a diffusers pipeline folder (configs, tokenizers, scheduler; weights not needed) or
      an architecture name (sd1, sd2, sdxl); None: the detected architecture's built-in configs.
    tokenizer: a CLIP tokenizer folder, needed without a config folder.
    vae: a VAE folder or file replacing the file's VAE (see load_vae).
    extract_ema: take the U-Net from the file's EMA copy (model_ema.*), as diffusers' option.
    prediction_type: "epsilon" / "v_prediction" (SD2 files do not say; see resolve()).
    param_dtype: the parameters' dtype (an fp16 / bf16 file is cast to it); dtype: compute.
    """
    from diffusion.pipelines.families import FAMILIES

    handle = open_checkpoint(path)
    keys = list(handle.keys())
    det = layout.detect(keys, lambda k: handle.get_slice(k).get_shape(), path)
    if not det.arch.loadable:
        raise SingleFileError(
            f"{path} is an {det.arch.name} checkpoint: recognised, but its pipeline "
            "(aesthetic-score conditioning) is not implemented"
        )
    res = resolve(path, det, config, tokenizer, prediction_type)
    if res.builtin:
        shape_of = lambda k: tuple(handle.get_slice(k).get_shape())  # noqa: E731
        preflight(shape_of, set(keys), det, res, path)
    parts = load_components(handle, path, det, res, vae=vae, extract_ema=extract_ema, dtype=dtype,
                            param_dtype=param_dtype)  # fmt: skip
    parts.update(res.tokenizers)
    try:
        spec = schedulers.from_config(res.scheduler)
    except ValueError as e:
        raise SingleFileError(f"scheduler of {config or det.arch.name}: {e}") from e
    cls = FAMILIES[loading.PIPELINE_CLASSES[res.pipeline]]
    configs = {name: res.configs[name] for name in parts if name in res.configs}
    pipe = cls(parts, spec, model_index=res.model_index, configs=configs, mesh=mesh)
    pipe.detection = det
    return pipe


def file_dtypes(path: str) -> dict[str, int]:
    """{dtype name: tensor count} of a safetensors file (header only)."""
    handle = open_checkpoint(path)
    out: dict[str, int] = {}
    for k in handle.keys():  # noqa: SIM118
        name = str(handle.get_slice(k).get_dtype())
        out[name] = out.get(name, 0) + 1
    return out


__all__ = ["SingleFileError", "load_single_file", "load_vae", "open_checkpoint", "file_dtypes"]
