"""PyTorch state dict <-> Flax NNX module conversion.

Our modules mirror the attribute names of the diffusers/transformers PyTorch classes
(``down_blocks[0].resnets[1].conv1``, ``to_out[0]``), so one generic rule maps a torch
state dict onto an NNX module:

  torch key ``a.b.0.c.weight``  ->  NNX variable at path ``('a', 'b', 0, 'c', <leaf>)``

where the leaf is whatever the target module holds: ``kernel`` (nnx.Linear / nnx.Conv; the
torch layout ``(out, in, *k)`` becomes ``(*k, in, out)``), ``scale`` (nnx.LayerNorm /
nnx.GroupNorm), ``embedding`` (nnx.Embed) or a parameter literally called ``weight``.
Any other leaf (``bias``, ``pos_embed``, ``class_embedding``...) keeps its name and layout.

Renames: the top-level model class may define ``torch_key_map(key) -> str | None``
(staticmethod) mapping a checkpoint key to the torch-style key of our structure; ``None``
drops the key (e.g. the non-persistent CLIP ``position_ids`` buffer found in old
checkpoints). If it renames keys (rather than only dropping them), define the inverse
``torch_key_unmap(key) -> str`` too so that ``to_torch_state_dict`` writes checkpoint keys.

Every ``nnx.Param`` must be present in the state dict; other variable types (buffers kept
as plain ``nnx.Variable``, e.g. a fixed positional embedding) are filled when present and
left alone otherwise. RNG state is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Our leaf names that are called "weight" in PyTorch.
_WEIGHT_ALIASES = ("kernel", "scale", "embedding")


class StateDictError(ValueError):
    """Missing, unexpected or mis-shaped tensors when loading a state dict."""


def _to_numpy(value: Any) -> np.ndarray:
    """torch.Tensor (any dtype, incl. bfloat16) / jax / numpy -> numpy, without importing torch."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; go via float32
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _iter_variables(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, variable) for every variable of the module graph except RNG state."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState):
            yield path, node


def _torch_key(path: tuple) -> str:
    """NNX path -> torch-style dotted key (leaf renamed to ``weight`` where torch calls it so)."""
    *prefix, leaf = (str(p) for p in path)
    if leaf in _WEIGHT_ALIASES:
        leaf = "weight"
    return ".".join([*prefix, leaf])


def _torch_to_ours(leaf: str, array: np.ndarray) -> np.ndarray:
    """Torch layout -> our layout for the leaf name of the target variable."""
    if leaf == "kernel" and array.ndim >= 2:
        # Linear (out, in) -> (in, out); ConvNd (O, I, *k) -> (*k, I, O).
        return np.transpose(array, (*range(2, array.ndim), 1, 0))
    return array


def _ours_to_torch(leaf: str, array: np.ndarray) -> np.ndarray:
    """Inverse of ``_torch_to_ours``."""
    if leaf == "kernel" and array.ndim >= 2:
        n = array.ndim  # (*k, I, O) -> (O, I, *k)
        return np.transpose(array, (n - 1, n - 2, *range(n - 2)))
    return array


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    """Our variable shape expressed in the torch layout (for error messages and checks)."""
    if leaf == "kernel" and len(shape) >= 2:
        return (shape[-1], shape[-2], *shape[:-2])
    return tuple(shape)


def _targets(model: nnx.Module) -> dict[str, tuple[str, nnx.Variable]]:
    """torch key -> (our leaf name, variable)."""
    targets = {}
    for path, var in _iter_variables(model):
        targets[_torch_key(path)] = (str(path[-1]), var)
    return targets


def _map_keys(model: nnx.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the model's optional ``torch_key_map`` (renames; None drops the key)."""
    key_map = getattr(type(model), "torch_key_map", None)
    if key_map is None:
        return dict(state_dict)
    mapped = {}
    for key, value in state_dict.items():
        new = key_map(key)
        if new is not None:
            mapped[new] = value
    return mapped


def _format_problems(missing, unexpected, misshaped) -> str:
    lines = [
        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors"
    ]
    lines += [f"  missing:    {k} (model shape {s}, torch layout)" for k, s in missing]
    lines += [f"  unexpected: {k} (checkpoint shape {s})" for k, s in unexpected]
    lines += [
        f"  mis-shaped: {k}: checkpoint shape {c} vs model shape {m} (torch layout)"
        for k, c, m in misshaped
    ]
    return "\n".join(lines)


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> None:
    """Copy a PyTorch state dict into ``model`` in place (see module docstring for the rules).

    Values may be torch tensors, numpy or jax arrays; they are cast to each target variable's
    dtype. Mis-shaped tensors are always an error (as in torch ``load_state_dict``); with
    ``strict`` missing parameters and unexpected keys are errors too. All problems are
    reported at once in one ``StateDictError``. Nothing is written unless all checks pass.
    """
    targets = _targets(model)
    source = _map_keys(model, state_dict)
    missing, unexpected, misshaped, updates = [], [], [], []
    for key, value in source.items():
        if key not in targets:
            unexpected.append((key, tuple(np.shape(value))))
            continue
        leaf, var = targets[key]
        want = _torch_shape(leaf, tuple(var.get_value().shape))
        if tuple(np.shape(value)) != want:
            misshaped.append((key, tuple(np.shape(value)), want))
            continue
        updates.append((leaf, var, value))
    for key, (leaf, var) in targets.items():
        if key not in source and isinstance(var, nnx.Param):
            missing.append((key, _torch_shape(leaf, tuple(var.get_value().shape))))
    if misshaped or (strict and (missing or unexpected)):
        raise StateDictError(_format_problems(missing, unexpected, misshaped))
    for leaf, var, value in updates:
        array = _torch_to_ours(leaf, _to_numpy(value))
        var.set_value(jnp.asarray(array, dtype=var.get_value().dtype))


def _torch_items(model: nnx.Module) -> Iterator[tuple[str, str, nnx.Variable]]:
    """(checkpoint key, our leaf name, variable) for everything ``to_torch_state_dict`` writes.

    Keys go through the model's optional ``torch_key_unmap``; keys that ``torch_key_map``
    would drop (non-persistent buffers) are left out.
    """
    cls = type(model)
    key_map = getattr(cls, "torch_key_map", None)
    key_unmap = getattr(cls, "torch_key_unmap", None)
    for key, (leaf, var) in _targets(model).items():
        if key_unmap is not None:
            key = key_unmap(key)
        if key_map is None or key_map(key) is not None:
            yield key, leaf, var


def persistent_buffers(model: nnx.Module) -> dict[str, np.ndarray]:
    """Tensors the PyTorch class saves but we compute rather than hold (its persistent buffers,
    e.g. SD3's sin-cos position table), from the model's optional
    ``torch_persistent_buffers()``. Loading ignores them; ``save_diffusers`` writes them so that
    ``from_pretrained`` finds every key it expects."""
    fn = getattr(model, "torch_persistent_buffers", None)
    return {} if fn is None else fn()


def to_torch_state_dict(model: nnx.Module, *, keys=None) -> dict[str, np.ndarray]:
    """The module's variables as a PyTorch-layout state dict of numpy arrays (inverse of load).

    ``keys`` (optional) restricts the output to those checkpoint keys, so large models can be
    written one shard at a time.
    """
    wanted = None if keys is None else set(keys)
    out = {}
    for key, leaf, var in _torch_items(model):
        if wanted is not None and key not in wanted:
            continue
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            raise ValueError(f"{key} is abstract (model built with nnx.eval_shape, never filled)")
        out[key] = np.ascontiguousarray(_ours_to_torch(leaf, np.array(value)))
    return out


def abstract_torch_state_dict(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Checkpoint key -> (torch-layout shape, dtype) of what ``to_torch_state_dict`` writes;
    works on abstract modules from ``nnx.eval_shape`` (used to plan checkpoint shards)."""
    out = {}
    for key, leaf, var in _torch_items(model):
        value = var.get_value()
        out[key] = (_torch_shape(leaf, tuple(value.shape)), value.dtype)
    return out
