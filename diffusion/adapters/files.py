"""LoRA files: read diffusers / PEFT and kohya (A1111) safetensors, write what diffusers reads.

Formats read (one file may hold several components: unet / transformer / text_encoder[_2|_3]):

    diffusers / PEFT   unet.<module>.lora_A.weight (r, in[, kh, kw]),
                       unet.<module>.lora_B.weight (out, r[, 1, 1]),
                       metadata "lora_adapter_metadata" = {"unet.r", "unet.lora_alpha",
                       "unet.alpha_pattern", ...} (diffusers' save_lora_weights), or a PEFT
                       folder (adapter_model.safetensors + adapter_config.json, keys prefixed
                       base_model.model.)
    older diffusers    <module>.lora.down/up.weight, .lora_linear_layer.down/up.weight,
                       <attn>.processor.to_q_lora.down/up.weight, <module>.alpha
    kohya / A1111      lora_unet_<module_with_underscores>.lora_down/lora_up.weight and .alpha;
                       lora_te_ / lora_te1_ -> text_encoder, lora_te2_ -> text_encoder_2;
                       1x1 and 3x3 conv entries (down (r, in, kh, kw), up (out, r, 1, 1))

CLIP module names are accepted with and without transformers' `text_model.` prefix.

Alpha, per module: the module's `alpha` tensor, else the file's adapter metadata (alpha_pattern,
then lora_alpha), else the rank; the delta is scale * alpha / rank * up @ down. diffusers 0.42
applies one alpha to many modules instead: with alpha tensors present, its code gives modules
without one the file's most common alpha (we use their rank), and kohya alphas of attention
projections (`to_q` ...) that differ from the most common one are replaced by it (its
alpha-pattern names miss those modules). It also drops kohya CLIP self-attention entries with
transformers 5 (unexpected keys). tests/test_lora.py::test_where_diffusers_differs checks ours
against numpy in those cases.

Written files: `<component>.<module>.lora_A/B.weight` in PyTorch layout, plus the metadata
{r, lora_alpha, target_modules} of each component whose modules share one rank and alpha;
otherwise alpha / rank is folded into lora_B and the component gets no metadata (diffusers then
uses alpha = rank), which gives the same outputs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re

import numpy as np

from diffusion.adapters import lora

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3",
              "controlnet")  # fmt: skip
KOHYA = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
         "lora_te2": "text_encoder_2"}  # fmt: skip
METADATA_KEY = "lora_adapter_metadata"
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")

_PATTERNS = [  # (regex on the key without component prefix, role, how group 1 names the module)
    (re.compile(r"(.+)\.lora_A\.weight"), "down"),
    (re.compile(r"(.+)\.lora_B\.weight"), "up"),
    (re.compile(r"(.+)\.(?:lora|lora_linear_layer)\.down\.weight"), "down"),
    (re.compile(r"(.+)\.(?:lora|lora_linear_layer)\.up\.weight"), "up"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
]
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_KOHYA = re.compile(r"(lora_unet|lora_te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)")


class LoRAFileError(ValueError):
    """A LoRA file that does not fit the model (message names the tensors)."""


@dataclasses.dataclass
class Entry:
    """One module's adapter as stored: torch-layout tensors, their keys, alpha if given."""

    keys: dict = dataclasses.field(default_factory=dict)  # role -> file key
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None


# ----------------------------------------------------------------------------- reading


def _file(path: str) -> str:
    if os.path.isdir(path):
        for name in WEIGHT_NAMES:
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"no {' / '.join(WEIGHT_NAMES)} in {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return path


def read(path_or_dict) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, adapter metadata) of a safetensors file, a folder holding one (diffusers'
    pytorch_lora_weights.safetensors, PEFT's adapter_model.safetensors + adapter_config.json)
    or an in-memory state dict."""
    if isinstance(path_or_dict, dict):
        return {k: np.asarray(v) for k, v in path_or_dict.items()}, {}
    from safetensors import safe_open

    file = _file(os.fspath(path_or_dict))
    with safe_open(file, framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        raw = (f.metadata() or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    config = os.path.join(os.path.dirname(file), "adapter_config.json")
    if not metadata and os.path.exists(config):  # a PEFT folder: one bare component
        with open(config) as f:
            metadata = json.load(f)
    return tensors, metadata


def _split_key(key: str) -> tuple[str | None, str, str, bool]:
    """(component or None, module name, role, is_kohya) of one file key."""
    m = _KOHYA.fullmatch(key)
    if m:
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
        return KOHYA[m[1]], m[2], role, True
    key = key.removeprefix("base_model.model.")
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        component, rest = None, key
    m = _PROCESSOR.fullmatch(rest)
    if m:
        module = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
        return component, module, m[3], False
    for pattern, role in _PATTERNS:
        m = pattern.fullmatch(rest)
        if m:
            return component, m[1], role, False
    raise LoRAFileError(
        f"tensor {key!r} is not a LoRA weight this loader knows (lora_A / lora_B, lora.down / "
        "lora.up, kohya lora_down / lora_up / alpha); DoRA and LoRA biases are not supported"
    )


def parse(tensors: dict) -> dict[str | None, dict[tuple[str, bool], Entry]]:
    """{component: {(module name, is_kohya): Entry}}; checks that every down has its up and
    that their ranks agree (naming both tensors)."""
    out: dict = collections.defaultdict(dict)
    for key, value in tensors.items():
        component, module, role, kohya = _split_key(key)
        entry = out[component].setdefault((module, kohya), Entry())
        entry.keys[role] = key
        if role == "alpha":
            entry.alpha = float(np.asarray(value).reshape(()))
        else:
            setattr(entry, role, np.asarray(value, np.float32))
    for (module, _), entry in (x for c in out.values() for x in c.items()):
        if entry.down is None or entry.up is None:
            have = ", ".join(entry.keys.values())
            raise LoRAFileError(f"module {module!r} has {have} but not both down and up weights")
        if entry.down.shape[0] != entry.up.shape[1]:
            raise LoRAFileError(
                f"rank mismatch: {entry.keys['down']} has shape {entry.down.shape} (rank "
                f"{entry.down.shape[0]}) but {entry.keys['up']} has {entry.up.shape} (rank "
                f"{entry.up.shape[1]})"
            )
    return dict(out)


def metadata_alpha(metadata: dict, component: str | None, module: str) -> float | None:
    """alpha of `module` from diffusers' adapter metadata ("<component>.lora_alpha",
    "<component>.alpha_pattern") or a PEFT adapter_config.json (no component prefix)."""
    pre = f"{component}." if component and f"{component}.lora_alpha" in metadata else ""
    patterns = metadata.get(pre + "alpha_pattern") or {}
    for pattern, alpha in patterns.items():  # PEFT's get_pattern_key rule
        if re.match(rf"(.*\.)?({pattern})$", module) or re.match(
            rf"(.*\.)?({pattern})$", module.removeprefix("text_model.")
        ):
            return float(alpha)
    alpha = metadata.get(pre + "lora_alpha")
    return None if alpha is None else float(alpha)


# ----------------------------------------------------------------------------- into a model


def _lookup(model) -> tuple[dict, dict]:
    """({module name: layer} under every accepted spelling, {kohya name: layer})."""
    names = {}
    for name, layer in lora.layers(model).items():
        names[name] = layer
        bare = name.removeprefix("text_model.")
        names[bare] = names["text_model." + bare] = layer
    return names, {n.replace(".", "_"): layer for n, layer in names.items()}


def _ours(entry: Entry) -> tuple[np.ndarray, np.ndarray]:
    """torch layout -> ours: down (r, in[, kh, kw]) -> (in, r) / (kh, kw, in, r);
    up (out, r[, 1, 1]) -> (r, out)."""
    down = entry.down.T if entry.down.ndim == 2 else entry.down.transpose(2, 3, 1, 0)
    up = entry.up.reshape(entry.up.shape[:2]).T  # (r, out)
    return down, up


def _check_shape(entry: Entry, layer, module: str) -> None:
    kernel = tuple(layer.kernel[...].shape)  # (in, out) / (kh, kw, in, out)
    r = entry.down.shape[0]
    want_down = (r, kernel[-2], *kernel[:-2])
    want_up = (kernel[-1], r, *(1,) * (len(kernel) - 2))
    for role, got, want in (("down", entry.down.shape, want_down), ("up", entry.up.shape, want_up)):
        if tuple(got) != want:
            raise LoRAFileError(
                f"{entry.keys[role]} has shape {tuple(got)} but module {module!r} (kernel "
                f"{kernel} in our layout) needs {want}: a LoRA for another architecture?"
            )


def _component_entries(parsed, component, path):
    if component in parsed:
        return parsed[component]
    if set(parsed) == {None}:  # a bare file (PEFT adapter of one model)
        return parsed[None]
    raise LoRAFileError(
        f"no LoRA tensors for {component!r} in {path}; it has {sorted(map(str, parsed))}"
    )


def apply(model, entries: dict, metadata: dict, component: str | None, *, adapter_name: str,
          scale: float = 1.0, source: str = "") -> list[str]:  # fmt: skip
    """Add the parsed `entries` of one component to `model` as adapter `adapter_name`."""
    names, kohya = _lookup(model)
    unknown = [e.keys["down"] for (m, k), e in entries.items() if m not in (kohya if k else names)]
    if unknown:
        raise LoRAFileError(
            f"{len(unknown)} LoRA tensors of {source or 'the file'} name modules that this "
            f"{type(model).__name__} does not have (a LoRA for another architecture?), e.g. "
            f"{unknown[:6]}; its Linear / Conv modules are named like "
            f"{lora.candidates(lora.layers(model))}"
        )
    plan = []
    for (module, is_kohya), entry in entries.items():
        layer = (kohya if is_kohya else names)[module]
        _check_shape(entry, layer, module)
        alpha = entry.alpha
        if alpha is None:
            alpha = metadata_alpha(metadata, component, module)
        plan.append((layer, entry, entry.down.shape[0] if alpha is None else alpha))
    added = []
    for layer, entry, alpha in plan:  # all checked: nothing is added on a bad file
        down, up = _ours(entry)
        lora.add_adapter(layer, adapter_name, down, up, alpha=alpha, weight=scale)
        added.append(entry.keys["down"])
    return added


def next_adapter_name(*models) -> str:
    """diffusers' default adapter names: default_0, default_1, ..."""
    have = set().union(*(lora.adapters(m) for m in models if m is not None))
    i = 0
    while f"default_{i}" in have:
        i += 1
    return f"default_{i}"


def load_lora(model, path, *, prefix: str | None = "unet", scale: float = 1.0,
              adapter_name: str | None = None) -> str:  # fmt: skip
    """Load the `prefix` component of a LoRA file (any format above) into a bare model as a new
    adapter (name default_<i> unless given); returns the adapter name."""
    tensors, metadata = read(path)
    name = adapter_name or next_adapter_name(model)
    entries = _component_entries(parse(tensors), prefix, path)
    apply(model, entries, metadata, prefix, adapter_name=name, scale=scale, source=str(path))
    return name


# ----------------------------------------------------------------------------- writing


def _torch(a: lora.LoRA, fold: bool) -> tuple[np.ndarray, np.ndarray]:
    """ours -> torch layout (inverse of _ours); fold multiplies up by alpha / rank."""
    down, up = np.asarray(a.down[...], np.float32), np.asarray(a.up[...], np.float32)
    if fold:
        up = up * (a.alpha / a.rank)
    down_t = down.T if down.ndim == 2 else down.transpose(3, 2, 0, 1)  # (r, in[, kh, kw])
    up_t = up.T.reshape(up.shape[1], up.shape[0], *(1,) * (down.ndim - 2))  # (out, r[, 1, 1])
    return np.ascontiguousarray(down_t), np.ascontiguousarray(up_t)


def state_dict(components: dict, adapter_name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of adapter `adapter_name` of {component: model} in diffusers' format."""
    tensors, metadata = {}, {}
    for component, model in components.items():
        mods = lora.adapters(model).get(adapter_name, {})
        if not mods:
            continue
        shapes = {(a.rank, a.alpha) for a in mods.values()}
        fold = len(shapes) > 1
        for module, a in mods.items():
            if a.merged:
                raise ValueError(f"adapter {adapter_name!r} is merged; unmerge before saving")
            down, up = _torch(a, fold)
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up
        if not fold:
            (rank, alpha), = shapes  # fmt: skip
            targets = sorted(m.removeprefix("text_model.") for m in mods)
            metadata |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                         f"{component}.target_modules": targets}  # fmt: skip
    if not tensors:
        raise ValueError(f"no adapter {adapter_name!r} in components {sorted(components)}")
    return tensors, metadata


def save_lora(path: str, components: dict, adapter_name: str = lora.DEFAULT_ADAPTER) -> str:
    """Write adapter `adapter_name` of {component: model} (e.g. {"unet": unet,
    "text_encoder": te}) as one safetensors file `pipe.load_lora_weights(path)` reads; a folder
    path gets pytorch_lora_weights.safetensors inside. Returns the file."""
    from safetensors.numpy import save_file

    tensors, metadata = state_dict(components, adapter_name)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, WEIGHT_NAMES[0])
    header = {"format": "pt"}
    if metadata:
        header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    save_file(tensors, path, metadata=header)
    return path
