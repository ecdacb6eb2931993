"""Pipeline benchmark: compile time vs number of steps, and int8 weight-only quantization.

    python -m experiments.benchmark_pipeline --workdir benchmarks/results/pipeline-cpu-DATE \\
        [--pipeline DIR] [--steps 2,8,32] [--batch 2] [--size 128]

Without --pipeline, writes a random-weight SD1.5-shaped folder (U-Net 32-64-128-128, VAE
32-32-64-64, 2-layer width-128 CLIP, DDIM) with our own save_diffusers to a temporary folder
and loads it with pipelines.load. Measures, for text_to_image at guidance 7.5:
- compile seconds (XLA trace + lower + compile, summed from jax.monitoring) and run seconds per
  image for each --steps value: one program per run, so compile time should not grow;
- int8 (pipeline.quantize_denoiser): denoiser weight bytes, the compiled program's argument
  and temporary bytes (XLA memory_analysis), seconds per image, and the difference of the
  images from the float32 ones (max / mean abs, PSNR) for the same latents;
- the weight bytes of the full-size SD1.5 / SDXL U-Nets in float32 and int8 (abstract shapes).
Writes results.json and report.md to the workdir. Timings are this machine's; nothing asserts
on them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from diffusion import models, pipelines
from diffusion.models.presets import get_preset
from diffusion.pipelines import programs, quantize
from diffusion.workdir import markdown_table

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "output folder")
flags.DEFINE_string("pipeline", None, "pipeline folder (default: write a random SD1.5-shaped one)")
flags.DEFINE_string("steps", "2,8,32", "comma-separated step counts")
flags.DEFINE_integer("batch", 2, "images per call")
flags.DEFINE_integer("size", 128, "image height and width")

_COMPILE = {"s": 0.0}
jax.monitoring.register_event_duration_secs_listener(
    lambda name, s, **_: (
        _COMPILE.__setitem__("s", _COMPILE["s"] + s)
        if name.startswith("/jax/core/compile/")
        else None
    )
)


def _tokenizer_files(folder: str, max_length: int = 77) -> int:
    """A byte-level CLIP BPE vocabulary without merges (every character a token)."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length}, f)
    return len(vocab)


def write_random_folder(path: str) -> str:
    """SD1.5-shaped, narrow, random weights (our modules, save_diffusers)."""
    vocab = _tokenizer_files(os.path.join(path, "tokenizer"))
    parts = {
        "unet": {**get_preset("sd15-unet"), "block_out_channels": [32, 64, 128, 128],
                 "cross_attention_dim": 128, "sample_size": 16},
        "vae": {**get_preset("sd-vae"), "block_out_channels": [32, 32, 64, 64]},
        "text_encoder": {**get_preset("clip-l"), "hidden_size": 128, "intermediate_size": 512,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": vocab,
                         "bos_token_id": vocab - 2, "eos_token_id": 2, "pad_token_id": vocab - 1},
    }  # fmt: skip
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
    for i, (name, config) in enumerate(parts.items()):
        cls, config_cls = models.get_model(models.presets.class_name(config))
        model = cls(config_cls.from_diffusers(config), rngs=nnx.Rngs(i))
        models.save_diffusers(model, os.path.join(path, name))
        index[name] = ["transformers" if name == "text_encoder" else "diffusers", config.get(
            "_class_name", config.get("architectures", [""])[0])]  # fmt: skip
    scheduler = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
                 "num_train_timesteps": 1000, "prediction_type": "epsilon"}  # fmt: skip
    os.makedirs(os.path.join(path, "scheduler"))
    for file, content in (("scheduler/scheduler_config.json", scheduler),
                          ("model_index.json", index)):  # fmt: skip
        with open(os.path.join(path, file), "w") as f:
            json.dump(content, f, indent=2)
    return path


def _timed(pipe, **kw):
    """(images, compile seconds, run seconds) of the first and of a second call."""
    c0, t0 = _COMPILE["s"], time.perf_counter()
    pipe.text_to_image(**kw)
    first, compile_s = time.perf_counter() - t0, _COMPILE["s"] - c0
    t0 = time.perf_counter()
    out = pipe.text_to_image(**kw)
    return out, compile_s, time.perf_counter() - t0, first


def _memory(pipe, **kw) -> dict:
    """XLA memory analysis of the generation program a call would run."""
    stats = {}
    jitted = jax.jit(programs.generate, static_argnums=(0, 1))

    def spy(*args):
        mem = jitted.lower(*args).compile().memory_analysis()
        stats.update(arg_bytes=int(mem.argument_size_in_bytes),
                     temp_bytes=int(mem.temp_size_in_bytes))  # fmt: skip
        return jitted(*args)

    original, programs.generate_jit = programs.generate_jit, spy
    try:
        pipe.text_to_image(**kw)
    finally:
        programs.generate_jit = original
    return stats


def _full_size_bytes() -> list[dict]:
    rows = []
    for preset in ("sd15-unet", "sdxl-unet"):
        config = get_preset(preset)
        cls, config_cls = models.get_model(config["_class_name"])
        model = models.build_abstract(cls, config_cls.from_diffusers(config))
        state = nnx.state(model, nnx.Param)
        q = jax.eval_shape(lambda s: quantize.quantize_int8(s), state)
        rows.append({"model": preset, "float32_bytes": quantize.nbytes(state),
                     "int8_bytes": quantize.nbytes(q)})  # fmt: skip
    return rows


def run(workdir: str, pipeline: str | None, steps: list[int], batch: int, size: int) -> dict:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the random folder is not kept
        pipe = pipelines.load(pipeline or write_random_folder(os.path.join(tmp, "sd15_random")))
    path = pipeline or "random SD1.5-shaped folder (write_random_folder)"
    latents = np.random.RandomState(0).randn(batch, size // 8, size // 8, 4).astype(np.float32)
    kw = dict(prompt=["a photo of a cat"] * batch, negative_prompt="blurry", height=size,
              width=size, guidance_scale=7.5, latents=latents)  # fmt: skip
    rows = []
    for n in steps:
        _, compile_s, run_s, first = _timed(pipe, num_steps=n, **kw)
        rows.append({"steps": n, "compile_s": round(compile_s, 2), "first_call_s": round(first, 2),
                     "run_s_per_image": round(run_s / batch, 4)})  # fmt: skip
        print(rows[-1])
    n = steps[-1]
    q = pipe.quantize_denoiser()
    ref, _, t_ref, _ = _timed(pipe, num_steps=n, **kw)
    out, _, t_q, _ = _timed(q, num_steps=n, **kw)
    mse = float(np.mean((out - ref) ** 2))
    int8 = {
        "steps": n,
        "denoiser_bytes": {"float32": quantize.nbytes(pipe._graph("denoiser")[1]),
                           "int8": quantize.nbytes(q._graph("denoiser")[1])},
        "program_memory": {"float32": _memory(pipe, num_steps=n, **kw),
                           "int8": _memory(q, num_steps=n, **kw)},
        "s_per_image": {"float32": round(t_ref / batch, 4), "int8": round(t_q / batch, 4)},
        "image_max_abs_diff": float(np.abs(out - ref).max()),
        "image_mean_abs_diff": float(np.abs(out - ref).mean()),
        "image_psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf"),
        "full_size": _full_size_bytes(),
    }  # fmt: skip
    result = {"command": "python -m experiments.benchmark_pipeline " + " ".join(sys.argv[1:]),
              "pipeline": path, "batch": batch, "size": size, "compile_vs_steps": rows,
              "int8": int8, "devices": [str(d) for d in jax.devices()]}  # fmt: skip
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    _report(workdir, result)
    return result


def _report(workdir: str, r: dict) -> None:
    q, mb = r["int8"], 2.0**20
    lines = ["# Pipeline benchmark", "", f"Batch {r['batch']}, {r['size']}x{r['size']}, "
             f"{r['devices'][0]}; `{r['pipeline']}`", "", "## Compile time vs steps", "",
             markdown_table(r["compile_vs_steps"], list(r["compile_vs_steps"][0])), "",
             "## int8 weight-only denoiser", ""]  # fmt: skip
    mem = q["program_memory"]
    lines.append(markdown_table([
        {"": k, "denoiser MiB": round(q["denoiser_bytes"][k] / mb, 2),
         "program args MiB": round(mem[k].get("arg_bytes", 0) / mb, 2),
         "program temp MiB": round(mem[k].get("temp_bytes", 0) / mb, 2),
         "s / image": q["s_per_image"][k]} for k in ("float32", "int8")
    ], ["", "denoiser MiB", "program args MiB", "program temp MiB", "s / image"]))  # fmt: skip
    full = [{"model": x["model"], "float32 GiB": round(x["float32_bytes"] / 2**30, 3),
             "int8 GiB": round(x["int8_bytes"] / 2**30, 3)} for x in q["full_size"]]  # fmt: skip
    lines += ["", f"Images ({q['steps']} steps, same latents): max abs diff "
              f"{q['image_max_abs_diff']:.4f}, mean abs diff {q['image_mean_abs_diff']:.5f}, "
              f"PSNR {q['image_psnr_db']:.1f} dB.", "", "Full-size weights (abstract):", "",
              markdown_table(full, ["model", "float32 GiB", "int8 GiB"])]  # fmt: skip
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    del argv
    steps = [int(s) for s in FLAGS.steps.split(",")]
    run(FLAGS.workdir, FLAGS.pipeline, steps, FLAGS.batch, FLAGS.size)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
