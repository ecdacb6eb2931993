"""Flax NNX models (NHWC) mirroring diffusers/transformers classes, and diffusers-folder I/O.

``MODELS`` maps the diffusers ``_class_name`` / transformers ``architectures[0]`` of a
config.json to ``(module class, config class)``. ``load_diffusers(path)`` reads a diffusers or
transformers folder (config.json + safetensors, single file or sharded) into our module;
``save_diffusers(model, path)`` writes one that ``<Class>.from_pretrained(path)`` loads.

``MODELS`` is built on first access (PEP 562 ``__getattr__``) so that importing
``diffusion.models.layers`` or ``.convert`` does not import every model file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion.models import convert
from diffusion.models.presets import class_name

# diffusers names the files diffusion_pytorch_model*.safetensors, transformers model*.safetensors.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_TRANSFORMERS_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


@functools.cache
def _registry() -> dict[str, tuple[type, type]]:
    from diffusion.models import controlnet, mmdit, t5, text, unet, vae

    models = {}
    for cls in (unet.UNet, vae.AutoencoderKL, mmdit.SD3Transformer, text.CLIPTextModel,
                text.CLIPTextModelWithProjection, t5.T5EncoderModel,
                controlnet.ControlNetModel):  # fmt: skip
        # Every model class names its config class and the diffusers/transformers class names
        # it reads (`diffusers_classes`, default: the one it writes, `diffusers_class`).
        for name in getattr(cls, "diffusers_classes", (cls.diffusers_class,)):
            models[name] = (cls, cls.config_class)
    return models


def __getattr__(name: str) -> Any:
    if name == "MODELS":
        return _registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_model(name: str) -> tuple[type, type]:
    """(module class, config class) for a diffusers/transformers class name."""
    models = _registry()
    if name not in models:
        raise ValueError(
            f"unknown model class {name!r}; known classes: {', '.join(sorted(models))}"
        )
    return models[name]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to build: its registry class name, typed config and compute dtype (fp32 params).

    `ModelSpec.from_config({"class_name": ..., "config": {diffusers config.json fields},
    "remat": bool}, dtype)` reads a run config's model section once; `spec.build(rngs)`.
    """

    class_name: str
    config: Any
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, section, dtype="float32") -> ModelSpec:
        _, config_cls = get_model(section["class_name"])
        d = {"_class_name": section["class_name"], **dict(section.get("config", {}))}
        config = config_cls.from_diffusers(d)
        if section.get("remat") and hasattr(config, "remat"):
            config = dataclasses.replace(config, remat=True)
        return cls(section["class_name"], config, jnp.dtype(dtype))

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        module_cls, _ = get_model(self.class_name)
        return module_cls(self.config, rngs=rngs, dtype=self.dtype, param_dtype=jnp.float32)


# ----------------------------------------------------------------------------- reading


class _LazyTensor:
    """A safetensors entry read only when converted (``np.asarray``); ``.shape`` is free."""

    def __init__(self, handle, key: str):
        self._handle, self._key = handle, key
        tensor = handle.get_slice(key)
        self.shape = tuple(tensor.get_shape())
        self.stored_dtype = str(tensor.get_dtype())  # safetensors name: F32, F16, BF16...

    def __array__(self, dtype=None, copy=None):
        array = self._handle.get_tensor(self._key)
        return array if dtype is None else array.astype(dtype)


def _weight_files(path: str, variant: str | None = None) -> list[str]:
    """The safetensors files of a folder: single file, or the shards listed in the index.

    variant ("fp16", "bf16"...): diffusers' variant names, `<stem>.<variant>.safetensors` and
    `<stem>.safetensors.index.<variant>.json`."""
    tag = f".{variant}" if variant else ""
    for stem in _WEIGHT_STEMS:
        single = os.path.join(path, f"{stem}{tag}.safetensors")
        index = os.path.join(path, f"{stem}.safetensors.index{tag}.json")
        if os.path.exists(single):
            return [single]
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    wanted = " / ".join(f"{s}{tag}.safetensors[.index{tag}.json]" for s in _WEIGHT_STEMS)
    hint = "" if variant else " (variant files need variant=, e.g. variant='fp16')"
    raise FileNotFoundError(f"no {wanted} in {path}; found {found}{hint}")


def read_state_dict(path: str, variant: str | None = None) -> dict[str, _LazyTensor]:
    """Lazy torch state dict of a diffusers/transformers folder (tensors read on use)."""
    from safetensors import safe_open

    state = {}
    for file in _weight_files(path, variant):
        handle = safe_open(file, framework="np")
        state.update({key: _LazyTensor(handle, key) for key in handle.keys()})  # noqa: SIM118
    return state


def read_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@contextlib.contextmanager
def _cheap_tracer_errors():
    """Workaround for a quadratic slowdown when tracing a module's init (nnx.eval_shape).

    Every ``rngs()`` call updates the RNG count, and flax's ``Variable.set_value`` compares
    ``getattr(value, 'sharding', None)``; on a tracer that raises AttributeError whose message
    jax builds by scanning every equation traced so far (``_origin_msg``). With ~2k parameters
    that is O(n^2): SDXL's U-Net took 341 s instead of ~20 s. The message is never shown here.
    """
    try:
        from jax._src.interpreters import partial_eval as pe

        original = pe.DynamicJaxprTracer._origin_msg
    except (ImportError, AttributeError):  # jax internals moved: just run slower
        yield
        return
    pe.DynamicJaxprTracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        pe.DynamicJaxprTracer._origin_msg = original


def eval_shape(fn):
    """``nnx.eval_shape(fn)`` (no arguments) without the tracer-error slowdown above."""
    with _cheap_tracer_errors():
        return nnx.eval_shape(fn)


def build_abstract(cls: type, config: Any, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """The module with abstract parameters (``nnx.eval_shape``: no memory) and concrete
    everything else (RNG state, constant buffers): those come from a jitted init whose
    parameter outputs are dropped, so XLA never computes the random weights."""
    make = lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    model = eval_shape(make)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree.leaves(rest):
        with _cheap_tracer_errors():
            nnx.update(model, jax.jit(lambda: nnx.state(make(), nnx.Not(nnx.Param)))())
    return model


def load_diffusers(
    path: str,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    strict: bool = True,
    variant: str | None = None,
) -> nnx.Module:
    """Read a diffusers (``_class_name``) or transformers (``architectures``) model folder.

    The module is built abstractly and then filled tensor by tensor, so a full-size model is
    held in memory once (plus one tensor); stored fp16 / bf16 tensors are cast to
    ``param_dtype``. ``variant`` reads diffusers' variant files (``variant="fp16"``:
    ``diffusion_pytorch_model.fp16.safetensors``, sharded ``...safetensors.index.fp16.json``).
    Raises ``convert.StateDictError`` naming every missing / unexpected / mis-shaped tensor.
    """
    config_dict = read_config(path)
    cls, config_cls = get_model(class_name(config_dict))
    config = config_cls.from_diffusers(config_dict)
    model = build_abstract(cls, config, dtype=dtype, param_dtype=param_dtype)
    convert.load_torch_state_dict(model, read_state_dict(path, variant), strict=strict)
    return model


# ----------------------------------------------------------------------------- writing


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy split of keys (in order) into shards of at most max_bytes (one big tensor alone)."""
    shards, current, total = [], [], 0
    for key, size in sizes.items():
        if current and total + size > max_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(key)
        total += size
    return shards + [current] if current else shards


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * factor)
    return int(size)


def save_diffusers(
    model: nnx.Module, path: str, *, max_shard_size: int | str = "5GB", dtype=None
) -> None:
    """Write ``config.json`` (``model.config.to_diffusers()``) and PyTorch-layout safetensors
    (sharded with an index above ``max_shard_size``), loadable by ``<Class>.from_pretrained``.
    ``dtype`` (e.g. ``"float16"``) stores every floating tensor in that type (as
    ``pipe.to(torch.float16).save_pretrained`` does); None keeps the parameters' own."""
    from safetensors.numpy import save_file

    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a

    config = model.config.to_diffusers()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    is_transformers = class_name(config) in _TRANSFORMERS_CLASSES
    stem = _WEIGHT_STEMS[1] if is_transformers else _WEIGHT_STEMS[0]
    abstract = convert.abstract_torch_state_dict(model)
    store = {k: jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(d, jnp.floating) else d
             for k, (_, d) in abstract.items()}  # fmt: skip
    sizes = {k: int(np.prod(s)) * jnp.dtype(store[k]).itemsize for k, (s, _) in abstract.items()}
    buffers = convert.persistent_buffers(model)
    sizes.update({k: v.nbytes for k, v in buffers.items()})
    shards = _shards(sizes, _parse_size(max_shard_size))
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for keys, name in zip(shards, names):  # one shard in host memory at a time
        tensors = convert.to_torch_state_dict(model, keys=keys)
        tensors.update({k: buffers[k] for k in keys if k in buffers})
        tensors = {k: cast(v) for k, v in tensors.items()}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {k: n for keys, n in zip(shards, names) for k in keys},
        }
        with open(os.path.join(path, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


__all__ = [
    "MODELS",
    "ModelSpec",
    "get_model",
    "load_diffusers",
    "save_diffusers",
    "read_config",
    "read_state_dict",
    "build_abstract",
    "eval_shape",
]
