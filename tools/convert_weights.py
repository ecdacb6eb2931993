"""Convert model weights between diffusers/transformers folders and NNX orbax checkpoints.

  # diffusers folder -> orbax checkpoint of the NNX parameters (+ config.json)
  python -m tools.convert_weights --src sd15/unet --dst ckpt/sd15_unet --to jax
  # orbax checkpoint (or a diffusers folder) -> diffusers folder that from_pretrained loads
  python -m tools.convert_weights --src ckpt/sd15_unet --dst out/unet --to torch
  # diffusers SD / SDXL pipeline folder -> single file in the original (WebUI) layout
  python -m tools.convert_weights --src sd15 --dst sd15.safetensors --to single [--dtype float16]
  # single file -> diffusers pipeline folder (configs from --config folder or built-in + tokenizer)
  python -m tools.convert_weights --src model.safetensors --dst model --to pipeline --config sd15

Single files (A1111 / Civitai layout) are read with `pipelines.load_single_file` and written
with `pipelines.save_single_file` (key maps in diffusion/models/ldm_keys.py); `--to single` keeps
the stored dtype unless --dtype is given, `--to pipeline` writes --dtype (default float32).

The NNX format is a folder with ``config.json`` (the same diffusers/transformers dict, so the
model class and config are known) and ``params/``, an orbax checkpoint of
``nnx.state(model, nnx.Param)`` as a pure dict. Every conversion is verified by reading the
written folder back and comparing all parameters exactly.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import diffusion.models as models
from diffusion.models import presets

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_PARAMS_DIR = "params"


def is_nnx_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, _PARAMS_DIR))


def save_nnx(model: nnx.Module, path: str) -> None:
    """config.json + orbax checkpoint of the parameters."""
    import json

    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_diffusers(), f, indent=2, sort_keys=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, _PARAMS_DIR), params, force=True)


def load_nnx(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
    """Inverse of ``save_nnx``: abstract build, then orbax restores straight into the shapes
    (stored dtype cast to ``param_dtype``)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    config = models.read_config(path)
    cls, config_cls = models.get_model(presets.class_name(config))
    model = models.build_abstract(
        cls, config_cls.from_diffusers(config), dtype=dtype, param_dtype=param_dtype
    )
    target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(path, _PARAMS_DIR), target)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def load_any(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
    """An NNX checkpoint folder (has params/) or a diffusers/transformers folder."""
    if is_nnx_checkpoint(path):
        return load_nnx(path, dtype=dtype, param_dtype=param_dtype)
    return models.load_diffusers(path, dtype=dtype, param_dtype=param_dtype)


def max_abs_diff(a: nnx.Module, b: nnx.Module) -> float:
    """Largest absolute parameter difference; raises if the parameter trees differ."""
    sa, sb = nnx.state(a, nnx.Param), nnx.state(b, nnx.Param)
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))),
        sa,
        sb,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def convert(src: str, dst: str, *, to: str, param_dtype=jnp.float32, max_shard_size="5GB"):
    """Load ``src`` (either format), write ``dst`` in format ``to`` and verify it. Returns a
    summary dict."""
    start = time.perf_counter()
    model = load_any(src, param_dtype=param_dtype)
    loaded_s = time.perf_counter() - start
    if to == "torch":
        models.save_diffusers(model, dst, max_shard_size=max_shard_size)
    elif to == "jax":
        save_nnx(model, dst)
    else:
        raise ValueError(f"unknown target format {to!r}; known: torch, jax")
    diff = max_abs_diff(model, load_any(dst, param_dtype=param_dtype))
    if diff != 0.0:
        raise RuntimeError(f"verification failed: written weights differ by up to {diff}")
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "class": type(model).__name__,
        "params": int(params),
        "load_s": loaded_s,
        "total_s": time.perf_counter() - start,
    }


def convert_single(src: str, dst: str, *, to: str, dtype: str | None = None, config=None,
                   tokenizer=None, extract_ema=False, prediction_type=None) -> dict:  # fmt: skip
    """Pipeline folder <-> single file, verified one tensor / one component at a time (a second
    copy of a full SDXL in memory would not fit beside the first): `--to single` re-derives
    every written tensor from the folder; `--to pipeline` reads each written component back."""
    from diffusion import pipelines
    from diffusion.pipelines import loading, single_file_write

    start = time.perf_counter()
    if to == "single":
        summary = pipelines.save_single_file(src, dst, dtype=dtype)
        single_file_write.verify_single_file(src, dst, dtype=dtype)
        return {**summary, "total_s": time.perf_counter() - start}
    param_dtype = DTYPES[dtype or "float32"]
    pipe = pipelines.load_single_file(
        src, config=config, tokenizer=tokenizer, extract_ema=extract_ema,
        prediction_type=prediction_type, param_dtype=param_dtype,
    )  # fmt: skip
    pipelines.save_pipeline_folder(pipe, dst)
    for name in loading.NETWORKS:
        if getattr(pipe, name, None) is not None:
            back = models.load_diffusers(os.path.join(dst, name), param_dtype=param_dtype)
            diff = max_abs_diff(getattr(pipe, name), back)
            if diff != 0.0:
                raise RuntimeError(f"verification failed: {name} differs by up to {diff}")
    return {"arch": pipe.detection.arch.name, "total_s": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert weights between diffusers/transformers folders, NNX orbax "
        "checkpoints and single-file checkpoints (verified by reading the result back).",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="folder, NNX ckpt or single file")
    parser.add_argument("--dst", required=True, help="output folder or file")
    parser.add_argument(
        "--to", choices=["torch", "jax", "single", "pipeline"], default="jax",
        help="torch: diffusers folder (config.json + safetensors); jax: NNX orbax checkpoint; "
        "single: pipeline folder -> original-layout .safetensors; pipeline: single file -> "
        "diffusers pipeline folder",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="param dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (torch)")
    parser.add_argument(
        "--config", default=None, help="--to pipeline: config folder or sd1/sd2/sdxl"
    )
    parser.add_argument("--tokenizer", default=None, help="--to pipeline: CLIP tokenizer folder")
    parser.add_argument("--extract-ema", action="store_true", help="--to pipeline: EMA U-Net")
    parser.add_argument(
        "--prediction-type", default=None, help="--to pipeline: epsilon / v_prediction"
    )
    args = parser.parse_args(argv)
    if args.to in ("single", "pipeline"):
        summary = convert_single(
            args.src, args.dst, to=args.to, dtype=args.dtype, config=args.config,
            tokenizer=args.tokenizer, extract_ema=args.extract_ema,
            prediction_type=args.prediction_type,
        )  # fmt: skip
        print(f"{summary['arch']}: {args.src} -> {args.dst} ({args.to}), verified, "
              f"{summary['total_s']:.1f}s")  # fmt: skip
        return summary
    dtype = args.dtype or "float32"
    summary = convert(
        args.src, args.dst, to=args.to, param_dtype=DTYPES[dtype],
        max_shard_size=args.max_shard_size,
    )  # fmt: skip
    print(
        f"{summary['class']}: {summary['params']:,} params, {args.src} -> {args.dst} "
        f"({args.to}, {dtype}), verified, {summary['total_s']:.1f}s"
    )
    return summary


if __name__ == "__main__":
    main()
