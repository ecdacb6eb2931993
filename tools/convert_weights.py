"""Convert model weights between diffusers/transformers folders and NNX orbax checkpoints.

  # diffusers folder -> orbax checkpoint of the NNX parameters (+ config.json)
  python -m tools.convert_weights --src sd15/unet --dst ckpt/sd15_unet --to jax
  # orbax checkpoint (or a diffusers folder) -> diffusers folder that from_pretrained loads
  python -m tools.convert_weights --src ckpt/sd15_unet --dst out/unet --to torch

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


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert weights between diffusers/transformers folders and NNX orbax "
        "checkpoints (verified by reading the result back).",
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="diffusers/transformers folder or NNX ckpt")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument(
        "--to", choices=["torch", "jax"], default="jax",
        help="torch: diffusers folder (config.json + safetensors); jax: NNX orbax checkpoint",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="param dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (torch)")
    args = parser.parse_args(argv)
    summary = convert(
        args.src, args.dst, to=args.to, param_dtype=DTYPES[args.dtype],
        max_shard_size=args.max_shard_size,
    )  # fmt: skip
    print(
        f"{summary['class']}: {summary['params']:,} params, {args.src} -> {args.dst} "
        f"({args.to}, {args.dtype}), verified, {summary['total_s']:.1f}s"
    )


if __name__ == "__main__":
    main()
