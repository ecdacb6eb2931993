"""Judge adherence of an exported shapes pipeline folder, sampled by diffusers or by our pipelines.

    python -m experiments.eval_exported --pipeline /tmp/shapes_sd --backend diffusers \\
        --out /tmp/shapes_sd_diffusers.json [--num_per_prompt 8] [--num_steps 25] [--guidance 4]

The same evaluation prompts and judge as experiments/eval_text2img.py, but the images come from
the folder tools/export_pipeline.py wrote: `--backend diffusers` runs diffusers' own pipeline
class (PyTorch, CPU; its scheduler and its own random latents from torch.Generator(seed)),
`--backend jax` runs diffusion.pipelines.load (the folder's scheduler). Comparing the score with
the training run's own eval shows that the export carries the model (within sampling noise).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

from diffusion.metrics import shapes_judge
from experiments import eval_text2img


def _diffusers_images(folder, prompts, n, num_steps, guidance, seed, batch=128):
    import diffusers
    import torch

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    cls = getattr(diffusers, index["_class_name"])
    kw = {"text_encoder_3": None, "tokenizer_3": None} if "transformer" in index else {}
    # float32 on CPU whatever the stored type: without it an fp16 export (--dtype float16) loads
    # its text encoders in fp16 (transformers keeps the stored type) and its MMDiT in fp32
    pipe = cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32, **kw)
    call = {"max_sequence_length": 0} if "transformer" in index else {}
    out = []
    gen = torch.Generator().manual_seed(seed)
    per_call = max(1, batch // n)  # prompts per pipeline call: one call per prompt is slow
    for i in range(0, len(prompts), per_call):
        chunk = [p for p in prompts[i : i + per_call] for _ in range(n)]
        with torch.no_grad():
            img = pipe(chunk, num_inference_steps=num_steps, guidance_scale=guidance,
                       output_type="np", generator=gen, **call).images  # fmt: skip
        out.append(img)
    images = np.concatenate(out)
    return images.reshape(len(prompts), n, *images.shape[1:])  # (P, N, H, W, 3) in [0, 1]


def _jax_images(folder, prompts, n, num_steps, guidance, seed):
    import jax

    from diffusion import pipelines

    pipe = pipelines.load(folder)
    kw = {"max_sequence_length": 0} if hasattr(pipe, "transformer") else {}
    out = []
    for i, p in enumerate(prompts):
        img = pipe.text_to_image([p] * n, num_steps=num_steps, guidance_scale=guidance,
                                 rng=jax.random.key(seed + i), **kw)  # fmt: skip
        out.append(np.asarray(img))
    return np.stack(out)


def evaluate(folder, backend, num_per_prompt=8, num_steps=25, guidance=4.0, seed=0,
             dataset="shapes/32x32", data_dir=None, judge_path=eval_text2img.JUDGE):  # fmt: skip
    prompts = eval_text2img.eval_prompts(eval_text2img.train_captions(dataset, data_dir))
    text = [p for p, _ in prompts]
    sample = {"diffusers": _diffusers_images, "jax": _jax_images}[backend]
    images = sample(folder, text, num_per_prompt, num_steps, guidance, seed)
    real = shapes_judge.real_images(dataset, "test", data_dir)[0]
    scores = eval_text2img.score(shapes_judge.load(judge_path), 2.0 * images - 1.0, prompts, real)
    scores.pop("adherent")
    setting = {"num_steps": num_steps, "guidance_scale": guidance, "seed": seed}
    return {"pipeline": os.path.abspath(folder), "backend": backend, "sampler": setting,
            "num_prompts": len(text), "num_per_prompt": num_per_prompt, **scores}  # fmt: skip


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    r = evaluate(f.pipeline, f.backend, f.num_per_prompt, f.num_steps, f.guidance, f.seed)
    with open(f.out, "w") as fh:
        json.dump(r, fh, indent=2)
    print(f"{f.backend}: adherence {r['adherence']:.3f} {r['adherence_by_group']}; FD in judge "
          f"features {r['fd_in_judge_features']:.1f}; wrote {f.out}")  # fmt: skip


if __name__ == "__main__":
    flags.DEFINE_string("pipeline", None, "an exported shapes pipeline folder")
    flags.DEFINE_enum("backend", "diffusers", ["diffusers", "jax"], "who samples")
    flags.DEFINE_string("out", None, "JSON file to write")
    flags.DEFINE_integer("num_per_prompt", 8, "samples per prompt")
    flags.DEFINE_integer("num_steps", 25, "sampler steps")
    flags.DEFINE_float("guidance", 4.0, "CFG scale")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.mark_flags_as_required(["pipeline", "out"])
    app.run(main)
