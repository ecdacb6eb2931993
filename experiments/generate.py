"""Prompt -> PNGs with a diffusers pipeline folder (SD 1/2, SDXL, SD3; diffusion/pipelines).

    python -m experiments.generate --pipeline DIR --prompt "a photo of a cat" --out DIR \\
        [--negative_prompt ...] [--method dpmpp_2m] [--steps 30] [--guidance 7.5] [--seed 0] \\
        [--num_images 4] [--batch_size 4] [--height 512 --width 512] \\
        [--image in.png [--mask mask.png] [--strength 0.8]] \\
        [--hires_scale 2 [--hires_upscale latent|pixel] [--tile_size 64]] \\
        [--travel_to "a photo of a dog" --frames 16] [--int8]

Mode: text-to-image; image-to-image with --image; inpainting with --image and --mask (white =
repaint); hi-res fix with --hires_scale; prompt travel with --travel_to (PNG frames and
travel.gif); Composable Diffusion when the prompt contains " AND " ("a cat AND a hat :0.5").
Writes image_000.png... (or frame_000.png...) and settings.json (every setting, the seed of each
image, compile time and seconds per image) into --out, which must not exist or be empty: the
files are written to a temporary folder beside it and moved there at the end, so a failed run
leaves nothing behind. Everything is checked (folder, files, sizes, strength) before generating.
A progress bar runs over batches; compile time (XLA, summed from jax.monitoring) and per-image
time are printed.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags
from tqdm import tqdm

from diffusion import pipelines, samplers
from diffusion.pipelines import images
from diffusion.workdir import check_new_folder, write_new_folder

FLAGS = flags.FLAGS
flags.DEFINE_string("pipeline", None, "diffusers pipeline folder (model_index.json)")
flags.DEFINE_string("prompt", None, "prompt (' AND ' joins Composable Diffusion parts)")
flags.DEFINE_string("out", None, "output folder (must not exist or be empty)")
flags.DEFINE_string("negative_prompt", None, "negative prompt")
flags.DEFINE_string("method", None, "sampler (samplers.SAMPLERS); default: the folder's")
flags.DEFINE_integer("steps", 30, "number of sampling steps")
flags.DEFINE_float("guidance", None, "guidance scale (default: the family's, 7.5/5/7)")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_integer("num_images", 1, "number of images")
flags.DEFINE_integer("batch_size", 4, "images per compiled call")
flags.DEFINE_integer("height", None, "image height (default: the model's)")
flags.DEFINE_integer("width", None, "image width (default: the model's)")
flags.DEFINE_string("image", None, "input image for image-to-image / inpainting")
flags.DEFINE_string("mask", None, "inpainting mask (white = repaint)")
flags.DEFINE_float("strength", None, "img2img / inpaint / hi-res strength")
flags.DEFINE_float("hires_scale", None, "hi-res fix upscale factor")
flags.DEFINE_enum("hires_upscale", "latent", ["latent", "pixel"], "hi-res upscaling")
flags.DEFINE_integer("tile_size", None, "tiled VAE decode tile (latent pixels)")
flags.DEFINE_string("travel_to", None, "prompt travel: the second prompt")
flags.DEFINE_integer("frames", 16, "prompt travel: number of frames")
flags.DEFINE_bool("int8", False, "int8 weight-only denoiser")

KEYS = ("pipeline", "prompt", "out", "negative_prompt", "method", "steps", "guidance", "seed",
        "num_images", "batch_size", "height", "width", "image", "mask", "strength",
        "hires_scale", "hires_upscale", "tile_size", "travel_to", "frames", "int8")  # fmt: skip
DEFAULTS = dict(negative_prompt=None, method=None, steps=30, guidance=None, seed=0, num_images=1,
                batch_size=4, height=None, width=None, image=None, mask=None, strength=None,
                hires_scale=None, hires_upscale="latent", tile_size=None, travel_to=None,
                frames=16, int8=False)  # fmt: skip

_COMPILE = {"seconds": 0.0}


def _on_event(name, seconds, **_):
    if name.startswith("/jax/core/compile/"):
        _COMPILE["seconds"] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_event)


def mode_of(s: dict) -> str:
    if s["travel_to"]:
        return "prompt_travel"
    if s["hires_scale"]:
        return "hires_fix"
    if s["image"] and s["mask"]:
        return "inpaint"
    if s["image"]:
        return "image_to_image"
    if s["mask"]:
        raise ValueError("--mask needs --image")
    return "composable" if " AND " in s["prompt"] else "text_to_image"


def check(s: dict):
    """Validate every setting before any generation; returns (pipeline, image, mask)."""
    for key in ("pipeline", "prompt", "out"):
        if not s.get(key):
            raise ValueError(f"--{key} is required")
    check_new_folder(s["out"], "--out ")
    for key in ("steps", "num_images", "batch_size", "frames"):
        if s[key] < 1:
            raise ValueError(f"--{key} must be >= 1, got {s[key]}")
    mode = mode_of(s)
    if s["strength"] is not None and not 0 < s["strength"] <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {s['strength']}")
    image = images.as_unit_images(images.load_image(s["image"])) if s["image"] else None
    mask = images.load_mask(s["mask"]) if s["mask"] else None
    pipe = pipelines.load(s["pipeline"])
    if s["int8"]:
        pipe = pipe.quantize_denoiser()
    if image is not None:
        images.check_size(image.shape[1], image.shape[2], pipe.size_factor)
        if mask is not None:
            images.as_mask(mask, 1, image.shape[1], image.shape[2])
        if mode == "inpaint":
            pipe.inpaint_mode()
    else:
        pipe.resolve_size(s["height"], s["width"])
    if s["method"] is not None:
        samplers.get(s["method"])
    return pipe, mode, image, mask


def _batch_call(pipe, mode, s, image, mask, prompts, rng):
    common = dict(negative_prompt=s["negative_prompt"], num_steps=s["steps"],
                  guidance_scale=s["guidance"], method=s["method"], rng=rng)  # fmt: skip
    size = dict(height=s["height"], width=s["width"])
    strength = {} if s["strength"] is None else {"strength": s["strength"]}
    if mode == "text_to_image":
        return pipe.text_to_image(prompts, **size, **common)
    if mode == "composable":
        return pipe.composable_text_to_image(prompts[0], num_images_per_prompt=len(prompts),
                                             **size, **common)  # fmt: skip
    if mode == "image_to_image":
        return pipe.image_to_image(prompts, image, **strength, **common)
    if mode == "inpaint":
        return pipe.inpaint(prompts, image, mask, **strength, **common)
    return pipe.hires_fix(prompts, scale=s["hires_scale"], upscale=s["hires_upscale"],
                          tile_size=s["tile_size"], **strength, **size, **common)  # fmt: skip


def generate(**settings) -> dict:
    """Run one generation job (keyword arguments as the flags); returns the settings.json dict."""
    s = {**DEFAULTS, **settings}
    pipe, mode, image, mask = check(s)
    record = {}

    def write(tmp):  # `out` is absent or empty (checked)
        record.update(_run(pipe, mode, s, image, mask, tmp))
        with open(os.path.join(tmp, "settings.json"), "w") as f:
            json.dump(record, f, indent=2)

    write_new_folder(os.path.abspath(s["out"]), write)
    return record


def _run(pipe, mode, s, image, mask, folder) -> dict:
    compile0, start = _COMPILE["seconds"], time.perf_counter()
    seeds, names = [], []
    if mode == "prompt_travel":
        bar = tqdm(total=s["frames"], desc="frames", unit="frame")
        frames = pipe.prompt_travel(
            s["prompt"], s["travel_to"], frames=s["frames"], batch_size=s["batch_size"],
            negative_prompt=s["negative_prompt"], height=s["height"], width=s["width"],
            guidance_scale=s["guidance"], num_steps=s["steps"], method=s["method"],
            rng=jax.random.key(s["seed"]), progress=lambda n: bar.update(n - bar.n),
        )  # fmt: skip
        bar.close()
        for i, frame in enumerate(frames):
            names.append(f"frame_{i:03d}.png")
            images.save_png(frame, os.path.join(folder, names[-1]))
        images.save_gif(frames, os.path.join(folder, "travel.gif"))
        names.append("travel.gif")
        count = len(frames)
    else:
        n, b = s["num_images"], s["batch_size"]
        for first in tqdm(range(0, n, b), desc=mode, unit="batch"):
            seed = s["seed"] + first  # image i of the run: seed + i // batch_size * batch_size
            out = _batch_call(pipe, mode, s, image, mask, [s["prompt"]] * min(b, n - first),
                              jax.random.key(seed))  # fmt: skip
            for j, img in enumerate(out):
                names.append(f"image_{first + j:03d}.png")
                seeds.append(seed)
                images.save_png(img, os.path.join(folder, names[-1]))
        count = n
    total = time.perf_counter() - start
    compile_s = _COMPILE["seconds"] - compile0
    per_image = (total - compile_s) / count
    print(f"{mode}: {count} images, compile {compile_s:.1f} s, {per_image:.3f} s per image "
          f"(total {total:.1f} s) -> {s['out']}")  # fmt: skip
    spec = pipe.scheduler
    return {
        "settings": {k: s[k] for k in KEYS},
        "mode": mode,
        "pipeline_class": type(pipe).__name__,
        "scheduler": {
            "class": spec.class_name,
            "method": s["method"] or spec.method,
            "options": dict(spec.options) if s["method"] is None else {},
        },  # fmt: skip
        "batch_seeds": seeds,
        "files": names,
        "compile_seconds": round(compile_s, 3),
        "seconds_per_image": round(per_image, 4),
        "total_seconds": round(total, 3),
        "devices": [str(d) for d in jax.devices()],
    }


def main(argv):
    del argv
    generate(**{k: getattr(FLAGS, k) for k in KEYS})


if __name__ == "__main__":
    flags.mark_flags_as_required(["pipeline", "prompt", "out"])
    app.run(main)
