"""Low-rank adapters (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", eq. 3) injected into the Linear and Conv layers of any NNX model.

A targeted layer keeps its base weight W and gains named adapters; its output becomes

    h = W x + sum_a  s_a * up_a(down_a(dropout(x))),      s_a = weight_a * alpha_a / rank_a

(PEFT's LoraLayer: down = lora_A, up = lora_B). For a Conv, `down` is a conv with the base's
kernel size, stride and padding and `up` a 1x1 conv (PEFT / kohya "LoCon"). Layers are adapted
in place: their class becomes `LoRALinear` / `LoRAConv` (subclasses of nnx.Linear / nnx.Conv),
so the base weights keep their paths (`to_q.kernel`) and the adapters live beside them
(`to_q.lora.<name>.down`). Adapter weights are `LoRAParam`s: `nnx.split(model, LoRAParam, ...)`
separates what LoRA training updates from the frozen base. The multiplier s_a is a `LoRAScale`
variable (state, not structure): `set_adapters` changes it without recompiling.

    names = inject(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4, rngs=nnx.Rngs(0))
    set_adapters(unet, ["default"], [0.8]); merge(unet); unmerge(unet); unload(unet)

Target names follow PEFT: a list entry matches a module whose name equals it or ends with
"." + entry; a single string is a regular expression matched against the full name. Names are
the PyTorch module names (`down_blocks.0.attentions.0.proj_in`, CLIP's
`text_model.encoder.layers.0.self_attn.q_proj`), so they agree with diffusers / PEFT files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_ADAPTER = "default"


class LoRAParam(nnx.Param):
    """An adapter weight: trained by LoRA runs while every plain nnx.Param stays frozen."""


class LoRAScale(nnx.Variable):
    """weight * alpha / rank of one adapter (a variable, so changing it does not recompile)."""


class LoRA(nnx.Module):
    """One adapter of one layer: delta(x) = scale * up(down(dropout(x))).

    down: (in, r) for a Linear, (kh, kw, in, r) for a Conv (our kernel layouts); up: (r, out).
    `merged` is the scale already added into the base weight (0: applied at call time)."""

    def __init__(self, down, up, *, alpha: float, weight: float = 1.0, dropout: float = 0.0):
        rank = down.shape[-1]
        if up.shape[0] != rank:
            raise ValueError(f"LoRA down has rank {rank} but up has {up.shape[0]} rows")
        self.down, self.up = LoRAParam(jnp.asarray(down)), LoRAParam(jnp.asarray(up))
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.scale = LoRAScale(jnp.asarray(weight * alpha / rank, jnp.float32))
        self.merged = 0.0
        self.dropout_key = nnx.data(None)  # set by `training(model, rng)` inside a train step

    def set_weight(self, weight: float) -> None:
        self.scale.set_value(jnp.asarray(weight * self.alpha / self.rank, jnp.float32))

    def delta_kernel(self):
        """The update to the base kernel: down @ up in the kernel's layout."""
        down, up = self.down[...], self.up[...]
        return jnp.einsum("...ir,ro->...io", down, up)  # (in, out) / (kh, kw, in, out)

    def _drop(self, x):
        if self.dropout == 0.0 or self.dropout_key is None:
            return x
        keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)


def _compute_dtype(layer, x):
    return layer.dtype or jnp.result_type(x.dtype, layer.param_dtype)


class LoRALinear(nnx.Linear):
    """nnx.Linear with adapters (see module docstring); the base call is unchanged."""

    def __call__(self, x):
        y = super().__call__(x)
        dtype = _compute_dtype(self, x)
        for a in self.lora.values():
            if a.merged == 0.0:
                h = a._drop(x).astype(dtype) @ a.down[...].astype(dtype)  # (..., r)
                y = y + (h @ a.up[...].astype(dtype)) * a.scale[...].astype(dtype)
        return y


class LoRAConv(nnx.Conv):
    """nnx.Conv with adapters: down is a conv with the base's geometry, up a 1x1 conv."""

    def __call__(self, x):
        y = super().__call__(x)
        dtype = _compute_dtype(self, x)
        for a in self.lora.values():
            if a.merged == 0.0:
                h = jax.lax.conv_general_dilated(
                    a._drop(x).astype(dtype), a.down[...].astype(dtype),
                    window_strides=_pair(self.strides, len(self.kernel_size)),
                    padding=self.padding,
                    rhs_dilation=_pair(self.kernel_dilation, len(self.kernel_size)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )  # fmt: skip  # (B, H', W', r)
                y = y + (h @ a.up[...].astype(dtype)) * a.scale[...].astype(dtype)
        return y


def _pair(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v or (1,) * n)


_LORA_CLASS = {nnx.Linear: LoRALinear, nnx.Conv: LoRAConv}


# ----------------------------------------------------------------------------- module names


def _torch_name(model, path: tuple) -> str:
    """The PyTorch module name of an NNX path (through the model's torch_key_unmap)."""
    name = ".".join(str(p) for p in path)
    unmap = getattr(type(model), "torch_key_unmap", None)
    return unmap(name + ".weight").removesuffix(".weight") if unmap else name


def layers(model) -> dict[str, nnx.Module]:
    """{PyTorch module name: layer} of every Linear / Conv that can take an adapter."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if type(node) in (nnx.Linear, nnx.Conv, LoRALinear, LoRAConv) and path:
            if isinstance(node, nnx.Conv) and node.feature_group_count != 1:
                continue  # grouped convs: no adapter
            out[_torch_name(model, path)] = node
    return out


def candidates(names: Iterable[str]) -> list[str]:
    """Short target names that select layers: last component (two for `to_out.0` style)."""
    short = set()
    for name in names:
        parts = name.split(".")
        short.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(short)


def match(names: Iterable[str], targets: str | Sequence[str]) -> list[str]:
    """Module names selected by PEFT-style targets; an entry that selects nothing raises an
    error listing the candidate names."""
    names = list(names)
    if isinstance(targets, str):
        found = [n for n in names if re.fullmatch(targets, n)]
        missing = [] if found else [targets]
    else:
        sel = lambda t: [n for n in names if n == t or n.endswith("." + t)]
        missing = [t for t in targets if not sel(t)]
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} match no Linear / Conv layer of this model; "
            f"candidate names: {candidates(names)}"
        )
    return found


# ----------------------------------------------------------------------------- adapters


def add_adapter(layer, name: str, down, up, *, alpha: float, weight: float = 1.0,
                dropout: float = 0.0) -> LoRA:  # fmt: skip
    """Attach adapter `name` (down, up in our layouts) to one Linear / Conv layer."""
    if type(layer) in _LORA_CLASS:
        layer.__class__ = _LORA_CLASS[type(layer)]  # in place: the base keeps its paths
        layer.lora = nnx.Dict()
    if name in layer.lora:
        raise ValueError(f"adapter {name!r} already exists on this layer; pick another name")
    kernel = layer.kernel[...]
    want_down = (*kernel.shape[:-1], down.shape[-1])
    if tuple(down.shape) != want_down or tuple(up.shape) != (down.shape[-1], kernel.shape[-1]):
        raise ValueError(
            f"adapter {name!r}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a "
            f"kernel {tuple(kernel.shape)} (want down {want_down}, up (r, {kernel.shape[-1]}))"
        )
    layer.lora[name] = adapter = LoRA(down, up, alpha=alpha, weight=weight, dropout=dropout)
    return adapter


def inject(model, targets, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
           adapter_name: str = DEFAULT_ADAPTER, rngs: nnx.Rngs) -> list[str]:  # fmt: skip
    """Add a fresh adapter to every layer `targets` selects; returns the module names.

    down ~ N(0, 1 / rank^2) (PEFT's init_lora_weights="gaussian", used by diffusers' training
    scripts), up = 0: the adapted model starts equal to the base. alpha defaults to rank."""
    table = layers(model)
    names = match(table, targets)
    for name in names:
        layer = table[name]
        k = layer.kernel[...]
        down = jax.random.normal(rngs.params(), (*k.shape[:-1], rank), jnp.float32) / rank
        up = jnp.zeros((rank, k.shape[-1]), jnp.float32)
        add_adapter(layer, adapter_name, down.astype(k.dtype), up.astype(k.dtype),
                    alpha=alpha or rank, dropout=dropout)  # fmt: skip
    return names


def _entries(model):
    """(adapter name, module name, layer, LoRA) for every adapter of the model."""
    for mod, layer in layers(model).items():
        for name, a in getattr(layer, "lora", {}).items():
            yield name, mod, layer, a


def adapters(model) -> dict[str, dict[str, LoRA]]:
    """{adapter name: {module name: LoRA}} of the model."""
    out: dict[str, dict[str, LoRA]] = {}
    for name, mod, _, a in _entries(model):
        out.setdefault(name, {})[mod] = a
    return out


def _check_names(model, names) -> set[str]:
    have = {name for name, *_ in _entries(model)}
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; this model has {sorted(have)}")
    return have


def set_adapters(model, names: str | Sequence[str], weights=None) -> None:
    """Activate `names` with `weights` (a number or one per name; default 1.0); every other
    adapter gets weight 0 (diffusers' `set_adapters`)."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else weights
    weights = [weights] * len(names) if isinstance(weights, int | float) else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
    _check_names(model, names)
    chosen = dict(zip(names, weights))
    for name, _, _, a in _entries(model):
        if a.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge before set_adapters")
        a.set_weight(chosen.get(name, 0.0))


def merge(model, names: Sequence[str] | None = None, scale: float = 1.0) -> None:
    """W += scale * s_a * delta_a for each adapter (all by default): no cost at call time."""
    have = _check_names(model, names or [])
    chosen = have if names is None else set(names)
    for name, _, layer, a in _entries(model):
        if name not in chosen:
            continue
        if a.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        s = scale * float(a.scale[...])
        k = layer.kernel
        k.set_value((k[...] + s * a.delta_kernel()).astype(k.dtype))
        a.merged = s if s != 0.0 else 1e-30  # remembered for unmerge (nonzero: "merged")


def unmerge(model) -> None:
    """Undo `merge` (subtract exactly the merged amounts)."""
    for _, _, layer, a in _entries(model):
        if a.merged:
            k = layer.kernel
            k.set_value((k[...] - a.merged * a.delta_kernel()).astype(k.dtype))
            a.merged = 0.0


def unload(model, names: Sequence[str] | None = None) -> None:
    """Remove adapters (all by default); merged ones stay in the base weights (PEFT's
    merge_and_unload). A layer without adapters is a plain nnx.Linear / nnx.Conv again."""
    for layer in layers(model).values():
        lora = getattr(layer, "lora", None)
        if lora is None:
            continue
        for name in list(lora):
            if names is None or name in names:
                del lora[name]
        if not len(lora):
            del layer.lora
            layer.__class__ = {LoRALinear: nnx.Linear, LoRAConv: nnx.Conv}[type(layer)]


def training(model, rng) -> None:
    """Turn on adapter dropout for one call (inside a train step, on the freshly merged
    model): each adapter gets its own key folded from rng."""
    for i, (*_, a) in enumerate(_entries(model)):
        if a.dropout > 0.0:
            a.dropout_key = jax.random.fold_in(rng, i)


def num_params(model) -> int:
    """Number of adapter weights (LoRAParam entries)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
