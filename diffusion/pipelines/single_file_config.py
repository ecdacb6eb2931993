"""The configs, tokenizers and scheduler a single-file checkpoint is loaded with.

`config=` is a diffusers pipeline folder (with or without weights: its model_index.json,
component config.json files, tokenizers and scheduler_config.json, as diffusers'
`from_single_file(path, config=folder)`), an architecture name, or None: the architecture's
built-in configs (the published models', single_file_layout.ARCHITECTURES) with a CLIP
tokenizer folder. `preflight` checks a few shapes of the file against built-in configs before
anything is built, so a fine-tuned-to-other-shapes file gets a short, clear error.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

from diffusion.models.presets import class_name
from diffusion.pipelines import loading
from diffusion.pipelines import single_file_layout as layout
from diffusion.pipelines.single_file_layout import SingleFileError


@dataclasses.dataclass
class Resolved:
    """Configs, tokenizers and scheduler of the pipeline a file is loaded into."""

    pipeline: str  # diffusers pipeline class
    configs: dict  # component -> config.json dict
    tokenizers: dict
    scheduler: dict
    model_index: dict
    builtin: bool  # the built-in configs (no config folder)


def prediction_type_hint(path: str) -> str | None:
    """The A1111 convention: a `<checkpoint>.yaml` beside the file whose
    model.params.parameterization is "v" marks a v-prediction model."""
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    if not os.path.isfile(yaml_path):
        return None
    import yaml

    with open(yaml_path) as f:
        doc = yaml.safe_load(f) or {}
    param = (doc.get("model", {}).get("params", {}) or {}).get("parameterization", "eps")
    return "v_prediction" if param == "v" else "epsilon"


def _from_folder(folder: str, det: layout.Detection) -> Resolved:
    index = loading.read_model_index(folder)
    family = loading.PIPELINE_CLASSES[index["_class_name"]]
    want = loading.PIPELINE_CLASSES.get(det.pipeline)
    if family != want:
        raise SingleFileError(
            f"config folder {folder} is a {index['_class_name']} but the file is "
            f"{det.arch.name} ({det.pipeline}); pass a matching config"
        )
    parts = loading.components_of(index)
    configs, toks = {}, {}
    for comp in det.arch.components:
        if parts.get(comp.name) is None:
            raise SingleFileError(f"config folder {folder} has no {comp.name!r} component")
        configs[comp.name] = loading.read_json(folder, comp.name, "config.json")
    for name, _ in det.arch.tokenizers:
        if parts.get(name) is not None:
            toks[name] = loading.load_tokenizer(folder, name, parts[name])
    sched = loading.read_json(folder, "scheduler", "scheduler_config.json")
    return Resolved(index["_class_name"], configs, toks, sched, index, builtin=False)


def _builtin(arch: layout.Architecture, det: layout.Detection, tokenizer: str | None) -> Resolved:
    import transformers

    if tokenizer is None:
        raise SingleFileError(
            f"the file is {arch.name}; without config= the built-in {arch.name} configs are used "
            "and a CLIP tokenizer folder is needed: pass tokenizer=<folder with vocab.json and "
            "merges.txt> (openai/clip-vit-large-patch14's), or config=<diffusers folder>"
        )
    configs = {c.name: dict(c.preset) for c in arch.components}
    configs["unet"]["in_channels"] = det.in_channels
    toks = {}
    for name, pad in arch.tokenizers:  # the published folders differ only in the pad token
        toks[name] = transformers.CLIPTokenizer.from_pretrained(
            tokenizer, pad_token=pad, local_files_only=True
        )
    index = layout.model_index(
        det.pipeline,
        {**{c.name: class_name(configs[c.name]) for c in arch.components},
         **{name: "CLIPTokenizer" for name, _ in arch.tokenizers}},
        arch.scheduler["_class_name"],
    )  # fmt: skip
    return Resolved(det.pipeline, configs, toks, dict(arch.scheduler), index, builtin=True)


def resolve(path: str, det: layout.Detection, config, tokenizer, prediction_type) -> Resolved:
    """Configs for the detected architecture from `config` (folder / architecture name / None)
    and the prediction type: explicit argument > config folder's scheduler > `<file>.yaml`
    (prediction_type_hint) > the architecture's default (SD2: v_prediction, as diffusers' default
    config stabilityai/stable-diffusion-2-1, with a warning)."""
    if isinstance(config, str) and os.path.isdir(config):
        res = _from_folder(config, det)
    elif config is None or config in layout.ARCHITECTURES:
        arch = layout.ARCHITECTURES[config or det.arch.name]
        if arch is not det.arch:
            raise SingleFileError(f"config={config!r} but {path} is {det.arch.name}")
        res = _builtin(arch, det, tokenizer)
        hint = prediction_type_hint(path)
        if prediction_type is None and hint is None and arch.name == "sd2":
            warnings.warn(
                f"{path}: SD 2.x v-prediction and epsilon checkpoints have identical weights' "
                "layout; using v_prediction (the 768-v models, diffusers' default). Pass "
                "prediction_type='epsilon' for 512-base models",
                stacklevel=3,
            )
        prediction_type = prediction_type or hint
        if (
            prediction_type or arch.scheduler["prediction_type"]
        ) == "epsilon" and arch.name == "sd2":
            res.configs["unet"]["sample_size"] = 64  # 512-base
    else:
        raise SingleFileError(
            f"config must be a diffusers pipeline folder or an architecture name "
            f"({', '.join(n for n, a in layout.ARCHITECTURES.items() if a.loadable)}); got "
            f"{config!r}"
        )
    if prediction_type is not None:
        res.scheduler = {**res.scheduler, "prediction_type": prediction_type}
    return res


def _markers(comp: layout.Component, config: dict) -> dict[str, tuple]:
    """A few tensors whose shapes follow from the config's main sizes: {file key: shape}."""
    p = comp.prefix
    if comp.kind == "unet":
        width = config["block_out_channels"][0]
        return {p + "input_blocks.0.0.weight": (width, config.get("in_channels", 4), 3, 3),
                p + "out.2.weight": (config.get("out_channels", 4), width, 3, 3)}  # fmt: skip
    if comp.kind == "vae":
        return {p + "encoder.conv_in.weight": (config["block_out_channels"][0], 3, 3, 3)}
    token = "text_model.embeddings.token_embedding.weight" if comp.kind == "clip" else (
        "token_embedding.weight")  # fmt: skip
    return {p + token: (config["vocab_size"], config["hidden_size"])}


def preflight(shape_of, keys: set, det: layout.Detection, res: Resolved, path: str) -> None:
    """With built-in configs: the file's main sizes (widths, channels, vocabulary, U-Net
    cross-attention width, text layers) must be the published model's, else a clear error
    before anything is built."""
    problems = []
    for comp in det.arch.components:
        config = res.configs[comp.name]
        want = _markers(comp, config)
        if comp.kind == "unet":
            attn = sorted(k for k in keys if k.startswith(comp.prefix) and
                          k.endswith("attn2.to_k.weight"))  # fmt: skip
            if attn:
                want[attn[0]] = (shape_of(attn[0])[0], config["cross_attention_dim"])
        elif comp.kind in ("clip", "openclip"):
            block = (
                "text_model.encoder.layers." if comp.kind == "clip" else "transformer.resblocks."
            )
            n = len({k[len(comp.prefix + block) :].split(".")[0] for k in keys
                     if k.startswith(comp.prefix + block)})  # fmt: skip
            extra = 1 if comp.kind == "openclip" else 0  # SD2 keeps 23 of 24 OpenCLIP blocks
            if n not in (config["num_hidden_layers"], config["num_hidden_layers"] + extra):
                problems.append(f"{comp.prefix}*: {n} layers, built-in {comp.name} config has "
                                f"{config['num_hidden_layers']}")  # fmt: skip
        for key, shape in want.items():
            if key in keys and tuple(shape_of(key)) != tuple(shape):
                problems.append(f"{key}: file {tuple(shape_of(key))} vs built-in {tuple(shape)}")
    if problems:
        raise SingleFileError(
            f"{path} has the {det.arch.name} layout but not the published {det.arch.name} model's "
            "shapes, so the built-in configs do not fit; pass config=<diffusers pipeline folder "
            "with this model's configs>:\n  " + "\n  ".join(problems)
        )
