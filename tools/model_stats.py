"""Parameter counts and forward FLOPs of the published presets; optional CPU speed benchmark.

python -m tools.model_stats --out stats.json
    For every preset in diffusion/models/presets.py: parameter count (nnx.eval_shape, no
    memory) and forward GFLOPs at batch 1 and the native resolution from XLA's cost analysis
    of the lowered program (abstract shapes: nothing is allocated or compiled). The VAE row
    is the decoder (latents -> image), the usual inference cost.

python -m tools.model_stats --checkpoint model.safetensors [--out stats.json]
    A single-file (A1111 / Civitai) checkpoint: the detected architecture (sd1, sd2, sdxl,
    sdxl-refiner; inpainting from the U-Net's input channels), and per component (U-Net, VAE,
    text encoders, EMA copy) its key prefix, tensor and parameter counts and stored dtypes,
    read from the file's header only (nothing is loaded).

python -m tools.model_stats --bench --out bench.json [--runs 5]
    For a small shared config per family: forward wall time of our jitted module vs the
    diffusers/transformers PyTorch module with the same weights on this CPU (median of
    --runs interleaved calls after warmup), with the ratio torch/ours. The fuller, reported
    comparison is experiments/benchmark_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import diffusion.models as models
from diffusion.models import presets
from experiments.throughput_lib import interleaved

# Token counts of the published pipelines: CLIP 77; SD3 joint context = 77 CLIP + 256 T5.
_CONTEXT_LEN = {"SD3Transformer2DModel": 333}


def example_inputs(config: dict, batch: int, res: int | None = None, rng=None):
    """Forward arguments of a model (NHWC), as ShapeDtypeStructs, or random arrays given rng.

    Returns (args, kwargs). ``res`` is the latent/image side (default: the config's
    sample_size, i.e. the native resolution).
    """
    name = presets.class_name(config)
    res = res or config.get("sample_size", 64)

    def arr(shape, dtype=jnp.float32, high=None):
        if rng is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        if high is not None:
            return rng.integers(0, high, size=shape).astype(np.int32)
        return rng.standard_normal(shape).astype(np.float32)

    t = arr((batch,)) if rng is None else np.full((batch,), 500.0, np.float32)
    if name in ("UNet2DConditionModel", "UNet2DModel"):
        x = arr((batch, res, res, config.get("in_channels", 4)))
        if name == "UNet2DModel":
            return (x, t), {}
        ctx = arr((batch, 77, config["cross_attention_dim"]))
        kwargs = {}
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + 6 time ids
            n_ids = 6
            text_dim = config["projection_class_embeddings_input_dim"]
            text_dim -= n_ids * config["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": arr((batch, text_dim)),
                "time_ids": arr((batch, n_ids)),
            }
        return (x, t, ctx), kwargs
    if name == "AutoencoderKL":
        f = 2 ** (len(config["block_out_channels"]) - 1)
        return (arr((batch, res // f, res // f, config.get("latent_channels", 4))),), {}
    if name == "SD3Transformer2DModel":
        x = arr((batch, res, res, config["in_channels"]))
        ctx = arr((batch, _CONTEXT_LEN[name], config["joint_attention_dim"]))
        return (x, ctx, arr((batch, config["pooled_projection_dim"])), t), {}
    if name.startswith("CLIPTextModel"):
        n = config.get("max_position_embeddings", 77)
        return (arr((batch, n), jnp.int32, high=config["vocab_size"]),), {}
    raise KeyError(f"no example inputs for {name!r}")


def forward_fn(name: str):
    """f(model, *args, **kwargs): the forward pass measured (VAE: decode)."""
    if name == "AutoencoderKL":
        return lambda m, *a, **k: m.decode(*a, **k)
    return lambda m, *a, **k: m(*a, **k)


def param_count(model) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def preset_stats(name: str, batch: int = 1) -> dict:
    """Parameter count and forward GFLOPs (XLA cost analysis, abstract shapes) of one preset."""
    config = presets.get_preset(name)
    cls_name = presets.class_name(config)
    cls, config_cls = models.get_model(cls_name)
    cfg = config_cls.from_diffusers(config)
    model = models.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    fwd = forward_fn(cls_name)
    args, kwargs = example_inputs(config, batch)

    def apply(state, args, kwargs):
        return fwd(nnx.merge(graphdef, state), *args, **kwargs)

    start = time.perf_counter()
    cost = jax.jit(apply).lower(state, args, kwargs).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    shape = args[0].shape
    return {
        "preset": name,
        "class": cls_name,
        "params": param_count(model),
        "input": "x".join(map(str, shape)),
        "gflops": float(cost.get("flops", float("nan"))) / 1e9,
        "lower_s": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- checkpoint


def checkpoint_stats(path: str) -> dict:
    """Architecture and per-component parameter counts / dtypes of a single-file checkpoint
    (header only). SD2's text encoder row counts the file's tensors, incl. the last OpenCLIP
    block and text_projection that diffusers' 23-layer text encoder does not use."""
    from diffusion.pipelines import single_file, single_file_layout

    handle = single_file.open_checkpoint(path)
    keys = list(handle.keys())
    det = single_file_layout.detect(keys, lambda k: handle.get_slice(k).get_shape(), path)
    groups = [(c.name, c.prefix) for c in det.arch.components]
    groups.append(("ema", single_file_layout.EMA_PREFIX))
    rows, seen = [], set()
    for name, prefix in groups:
        mine = [k for k in keys if k.startswith(prefix)
                and not single_file_layout.NOT_WEIGHTS.fullmatch(k)]  # fmt: skip
        if not mine:
            continue
        seen |= set(mine)
        rows.append(_row(handle, name, prefix, mine))
    other = [k for k in keys if k not in seen]
    if other:
        rows.append(_row(handle, "not weights / other", "", other))
    return {"file": path, "arch": det.arch.name, "pipeline": det.pipeline,
            "unet_in_channels": det.in_channels, "has_ema": det.has_ema, "rows": rows}  # fmt: skip


def _row(handle, name: str, prefix: str, keys: list[str]) -> dict:
    params, dtypes = 0, {}
    for k in keys:
        tensor = handle.get_slice(k)
        params += math.prod(tensor.get_shape())
        dtype = str(tensor.get_dtype())
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    dtypes = " ".join(f"{d}:{n}" for d, n in sorted(dtypes.items()))
    return {"component": name, "prefix": prefix + "*", "tensors": len(keys), "params": params,
            "dtypes": dtypes}  # fmt: skip


# ----------------------------------------------------------------------------- benchmark

# Small shared configs: one per family, big enough that compute dominates overheads.
BENCH = {
    "unet": dict(
        _class_name="UNet2DConditionModel", sample_size=32, in_channels=4, out_channels=4,
        layers_per_block=1, block_out_channels=[64, 128], norm_num_groups=32,
        cross_attention_dim=128, attention_head_dim=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    ),
    "vae": dict(
        _class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
        layers_per_block=1, block_out_channels=[64, 128], norm_num_groups=32, sample_size=64,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    ),
    "mmdit": dict(
        _class_name="SD3Transformer2DModel", sample_size=32, patch_size=2, in_channels=16,
        out_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=256, caption_projection_dim=128, pooled_projection_dim=128,
        pos_embed_max_size=32,
    ),
    "clip": dict(
        architectures=["CLIPTextModel"], vocab_size=1000, hidden_size=256, intermediate_size=1024,
        num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=77, eos_token_id=2,
        hidden_act="quick_gelu", projection_dim=256,
    ),
}  # fmt: skip


def _torch_model(config: dict):
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    name = presets.class_name(config)
    if name.startswith("CLIP"):
        kw = {k: v for k, v in config.items() if k != "architectures"}
        return getattr(transformers, name)(transformers.CLIPTextConfig(**kw)).eval()
    return getattr(diffusers, name).from_config(config).eval()


def bench_family(family: str, batch: int, runs: int) -> dict:
    """Median forward seconds of ours (jit) vs PyTorch on the same weights and inputs."""
    import torch

    config = BENCH[family]
    name = presets.class_name(config)
    torch_model = _torch_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        ours = models.load_diffusers(tmp)
    args, kwargs = example_inputs(config, batch, rng=np.random.default_rng(0))
    graphdef, state = nnx.split(ours)
    fwd = forward_fn(name)
    apply = jax.jit(lambda s, a, k: fwd(nnx.merge(graphdef, s), *a, **k))
    run_ours = lambda: jax.block_until_ready(apply(state, args, kwargs))

    to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy() if a.ndim == 4 else a)
    t_args = [to_t(np.asarray(a)) for a in args]
    t_kwargs = {k: {kk: torch.from_numpy(v) for kk, v in d.items()} for k, d in kwargs.items()}
    t_fwd = torch_model.decode if name == "AutoencoderKL" else torch_model

    def run_torch():
        with torch.no_grad():
            return t_fwd(*t_args, **t_kwargs)

    # Interleaved calls (as benchmark_throughput): the shared machine's load hits both alike.
    sec = interleaved({"ours": run_ours, "torch": run_torch}, runs)
    ours_s, torch_s = sec["ours"], sec["torch"]
    return {
        "family": family,
        "class": name,
        "params": param_count(ours),
        "input": "x".join(map(str, np.shape(args[0]))),
        "ours_ms": 1e3 * ours_s,
        "torch_ms": 1e3 * torch_s,
        "torch_over_ours": torch_s / ours_s,
        "torch_threads": torch.get_num_threads(),
    }


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", action="store_true", help="CPU speed: ours vs PyTorch")
    parser.add_argument("--checkpoint", default=None, help="a single-file checkpoint to describe")
    parser.add_argument(
        "--presets", nargs="*", default=None, help=f"subset of {list(presets.PRESETS)}"
    )
    parser.add_argument("--families", nargs="*", default=list(BENCH), help="--bench families")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5, help="--bench timed runs (median)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.checkpoint:
        stats = checkpoint_stats(args.checkpoint)
        ema = "yes" if stats["has_ema"] else "no"
        print(f"{stats['file']}: {stats['arch']} ({stats['pipeline']}), U-Net input channels "
              f"{stats['unet_in_channels']}, EMA copy: {ema}")  # fmt: skip
        print(_table(stats["rows"], ["component", "prefix", "tensors", "params", "dtypes"]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(stats, f, indent=2)
        return stats
    if args.bench:
        rows = [bench_family(f, args.batch, args.runs) for f in args.families]
        cols = ["family", "class", "params", "input", "ours_ms", "torch_ms", "torch_over_ours"]
    else:
        names = args.presets or list(presets.PRESETS)
        rows = []
        for n in names:
            rows.append(preset_stats(n, args.batch))
            print(f"  {n}: {rows[-1]['gflops']:.1f} GFLOPs", flush=True)
        cols = ["preset", "class", "params", "input", "gflops"]
    print(_table(rows, cols))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
