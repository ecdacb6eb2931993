"""Writing single-file checkpoints (diffusers folder -> original LDM layout) and pipeline folders.

    save_single_file("sd-folder", "model.safetensors")       # for the WebUI / from_single_file
    verify_single_file("sd-folder", "model.safetensors")     # tensor by tensor
    save_pipeline_folder(pipelines.load_single_file(...), "sd-folder")   # and back

`save_single_file` streams: it reads each tensor of the folder lazily, maps it through the key
maps of diffusion/models/ldm_keys.py (q/k/v fused into OpenCLIP's in_proj, VAE attention as 1x1
convolutions, text_projection transposed) and writes it at its place in a safetensors file whose
header was written first, so neither the folder nor the file is ever held in memory. Values are
copied bit for bit (unless `dtype` asks for a cast).

The SD 2.x text encoder is written with the layers the diffusers folder has (23 of OpenCLIP-H's
24 blocks, no text_projection): diffusers and our loader read it; the original LDM code
(FrozenOpenCLIPEmbedder) builds all 24 blocks, so a WebUI loads it with strict=False only.
"""

from __future__ import annotations

import json
import os

import numpy as np

from diffusion import models
from diffusion.models import ldm_keys
from diffusion.models.presets import class_name
from diffusion.pipelines import loading
from diffusion.pipelines import single_file_layout as layout
from diffusion.workdir import check_new_folder, write_new_folder

# safetensors dtype names <-> numpy (bfloat16 through ml_dtypes, as safetensors' numpy backend).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def write_safetensors(path: str, items: list, metadata: dict | None = None) -> int:
    """Stream tensors into a safetensors file: items are (key, shape, dtype name, produce) with
    `produce()` returning the array; one array is in memory at a time. Returns bytes written.

    Format (safetensors spec): 8-byte little-endian header length, JSON header
    {key: {dtype, shape, data_offsets}, "__metadata__": {...}} padded with spaces to a multiple
    of 8, then the tensors' bytes in header order."""
    header, offset = {}, 0
    for key, shape, dtype, _ in items:
        size = int(np.prod(shape, dtype=np.int64)) * _np_dtype(dtype).itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for key, shape, dtype, produce in items:
            array = np.ascontiguousarray(produce())
            if array.shape != tuple(shape) or array.dtype != _np_dtype(dtype):
                raise ValueError(f"{key}: produced {array.shape} {array.dtype}, planned "
                                 f"{tuple(shape)} {dtype}")  # fmt: skip
            f.write(array.tobytes())
    os.replace(tmp, path)  # never a half-written file at `path`
    return 8 + len(blob) + offset


def architecture_of(folder: str, index: dict) -> layout.Architecture:
    """The single-file architecture a diffusers folder is written as: SDXL folders as sdxl;
    SD folders as sd1 (OpenAI CLIP text encoder, quick_gelu) or sd2 (OpenCLIP, gelu)."""
    family = loading.PIPELINE_CLASSES[index["_class_name"]]
    if family == "sdxl":
        return layout.ARCHITECTURES["sdxl"]
    if family == "sd":
        text = loading.read_json(folder, "text_encoder", "config.json")
        openclip = text.get("hidden_act", "quick_gelu") != "quick_gelu"
        return layout.ARCHITECTURES["sd2" if openclip else "sd1"]
    raise ValueError(
        f"{index['_class_name']} folders have no single-file layout here; supported: "
        "StableDiffusion[XL]Pipeline folders (sd1, sd2, sdxl)"
    )


def _component_items(folder, comp, *, dtype, variant):
    """(key, shape, dtype, produce) for one component's tensors in the original layout."""
    state = models.read_state_dict(os.path.join(folder, comp.name), variant)
    if comp.kind in ("clip", "openclip"):  # transformers >= 5.6 writes CLIPTextModel unprefixed
        state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                 for k, v in state.items() if not k.endswith("position_ids")}  # fmt: skip
    groups: dict[str, list] = {}
    for key, entry in ldm_keys.key_map(comp.kind, state).items():
        groups.setdefault(comp.prefix + entry.key, []).append((entry, state[key]))
    items = []
    for key, parts in groups.items():
        entries = [e for e, _ in parts]
        shape = ldm_keys.original_shape(entries, [t.shape for _, t in parts])
        src = _DTYPES[parts[0][1].stored_dtype]
        out = dtype or src

        def produce(entries=entries, parts=parts, out=out):
            arrays = [np.asarray(t) for _, t in parts]
            return ldm_keys.to_original(entries, arrays).astype(_np_dtype(out), copy=False)

        items.append((key, shape, out, produce))
    return items


def _items(folder: str, *, dtype, variant):
    arch = architecture_of(folder, loading.read_model_index(folder))
    items = []
    for comp in arch.components:
        items += _component_items(folder, comp, dtype=dtype, variant=variant)
    return arch, items


def save_single_file(folder: str, path: str, *, dtype: str | None = None,
                     variant: str | None = None) -> dict:  # fmt: skip
    """Write a diffusers SD / SDXL pipeline folder as one original-layout .safetensors file.

    dtype: cast floating tensors ("float16", "bfloat16", "float32"; default: as stored);
    variant: read the folder's variant weights. Returns {arch, tensors, bytes}."""
    arch, items = _items(folder, dtype=dtype, variant=variant)
    size = write_safetensors(path, items, metadata={"format": "pt"})
    return {"arch": arch.name, "tensors": len(items), "bytes": size}


def verify_single_file(folder: str, path: str, *, dtype: str | None = None,
                       variant: str | None = None) -> int:  # fmt: skip
    """Check, one tensor at a time, that `path` holds exactly what save_single_file(folder)
    writes (keys, shapes, dtypes, values). Returns the number of tensors checked."""
    from safetensors import safe_open

    _, items = _items(folder, dtype=dtype, variant=variant)
    handle = safe_open(path, framework="np")
    if set(handle.keys()) != {key for key, *_ in items}:
        raise ValueError(f"{path}: keys differ from those written for {folder}")
    for key, _, _, produce in items:
        got, want = handle.get_tensor(key), produce()
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            raise ValueError(f"{path}: tensor {key} differs from the folder's")
    return len(items)


def save_pipeline_folder(pipe, path: str) -> str:
    """Write a loaded pipeline (e.g. from load_single_file) as a diffusers pipeline folder:
    networks with models.save_diffusers and their original config.json dicts, tokenizers,
    scheduler_config.json and model_index.json. Written beside `path` and renamed into place;
    `path` must not exist or be empty."""
    check_new_folder(path)

    def write(tmp):
        classes = {}
        for name in loading.NETWORKS + loading.TOKENIZERS:
            part = getattr(pipe, name, None)
            if part is None:
                continue
            out = os.path.join(tmp, name)
            if name in loading.NETWORKS:
                models.save_diffusers(part, out)
                config = pipe.configs.get(name) or part.config.to_diffusers()
                with open(os.path.join(out, "config.json"), "w") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
                classes[name] = class_name(config)
            else:
                part.save_pretrained(out)
                classes[name] = type(part).__name__
        spec = pipe.scheduler
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump({**dict(spec.config), "_class_name": spec.class_name}, f, indent=2)
        pipeline = pipe.model_index.get("_class_name") or layout.ARCHITECTURES["sd1"].pipeline
        index = layout.model_index(pipeline, classes, spec.class_name)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    return write_new_folder(path, write)
