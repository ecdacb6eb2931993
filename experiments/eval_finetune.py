"""What a fine-tuning run on the shapes model changed, measured against its base model.

    python -m experiments.eval_finetune --workdir /work/runs/shapes_lora [--num_per_prompt 8]
    python -m experiments.eval_finetune --workdir W --memory   # LoRA vs full: params, bytes

Reads the run's config and measures the fine-tuned model and its base (the run's `base`
workdir or pipeline folder) with the same prompts, seeds and sampler (the run's `sample`
settings), by the direct measures of diffusion/adapters/concepts.py and the shapes judge:

  LoRA, new colour (configs/shapes_lora.py): `concept_rate`, the share of samples of 16
      "a purple <shape> ..." prompts whose foreground is mostly purple (color_fraction > 0.5).
  DreamBooth (configs/shapes_dreambooth.py): `concept_rate`, the share of samples of 16
      "a sks square ..." prompts that show the subject (is_subject); `ordinary_adherence`, the
      judge's full-prompt adherence on the same prompts with "sks" replaced by a training colour;
      `drift`, the share of samples of the class prompts ("a square ...") that show the subject.
  both: `standard_adherence`, the judge on eval_text2img's 32 evaluation prompts (what the base
      could do before; fine-tuning should keep it within a stated margin).
  ControlNet (configs/shapes_controlnet.py): for test-split examples, samples of their captions
      with their layout mask as control (the ControlNet) and without (the base):
      `mask_iou` of each sample's foreground with the layout, and the judge's adherence.

Writes eval_finetune.json, eval_finetune.png (per prompt: the base's row, then the fine-tuned
model's; ControlNet: rows of controls, base samples, controlled samples), a metrics.jsonl line,
and for LoRA runs the adapters as a diffusers LoRA file (<workdir>/lora/).
`--memory` compiles one training step of the run's config and of the same config with the other
method (lora <-> full) and reports trained / frozen parameter counts and XLA's memory analysis
(argument, output, temporary bytes; peak ~ argument + temporary, the state being donated).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from diffusion import images, sharding, tasks
from diffusion.adapters import concepts, control, finetune
from diffusion.data import shapes
from diffusion.metrics import shapes_judge
from diffusion.train_state import restore_ema
from diffusion.workdir import Workdir, markdown_table, read_config
from experiments import eval_text2img

DATA = "shapes/32x32"  # the base model's data: standard prompts, real images
EVAL_SEED = 77  # concept prompts: an example stream training (seed 0) and priors (1000+) skip


def _shape(task, image_size: int) -> tuple[int, int, int]:
    """The latent shape of `image_size` px images."""
    side = image_size // task.latents.factor
    return (side, side, task.model.config.in_channels)


def _setting(task) -> dict:
    s = task.sampling
    return {"method": s.method, "num_steps": s.num_steps, "guidance": s.guidance_scale,
            "grid": s.grid}  # fmt: skip


def ordinary_prompts(subject_prompts: list[str]) -> list[str]:
    """The subject prompts with the rare token replaced by training colours, in turn."""
    names = list(shapes.COLORS)
    return [p.replace(f"{concepts.SUBJECT_TOKEN} square", f"{names[i % len(names)]} square", 1)
            for i, p in enumerate(subject_prompts)]  # fmt: skip


def _prompt_rows(base, tuned, prompts, marks_base, marks_tuned):
    """Interleaved (2P, N, ...) rows and labels: each prompt's base row, then the tuned one."""
    rows = np.stack([r for pair in zip(base, tuned) for r in pair])
    text = [f"{who}: {p}" for p in prompts for who in ("base", "tuned")]
    marks = [m for pair in zip(marks_base, marks_tuned) for m in pair]
    return rows, text, marks


def _base_data(task) -> str:
    """The shapes dataset the base model trained on (DATA for a pipeline folder)."""
    if os.path.exists(os.path.join(task.base_path, "config.json")):
        return read_config(task.base_path).data.name
    return DATA


def eval_concept(task, model, n, seed, judge, data_dir, num_prompts=16, standard=(16, 8, 8)):
    """LoRA / DreamBooth measures (module docstring) for the tuned model and its base;
    `standard`: eval_text2img.eval_prompts' (single, seen, unseen) counts."""
    base_task, base_model = task.base()
    kind, data_name = task.concept.kind, _base_data(task)
    prompts = concepts.examples(kind, num_prompts, EVAL_SEED)[1]
    hit = (lambda x: concepts.color_fraction(x, concepts.NEW_COLOR[0]) > 0.5) if kind == (
        "new_color") else concepts.is_subject  # fmt: skip
    sets = {"concept": prompts}
    if kind == "subject":
        sets |= {"ordinary": ordinary_prompts(prompts),
                 "drift": [concepts.class_prompt(p) for p in prompts]}  # fmt: skip
    standard = eval_text2img.eval_prompts(eval_text2img.train_captions(data_name, data_dir),
                                          *standard)  # fmt: skip
    real = shapes_judge.real_images(data_name, "test", data_dir)[0]
    out, grids = {}, {}
    for who, t, m in (("base", base_task, base_model), ("tuned", task, model)):
        shape = _shape(t, task.concept.image_size or 32)
        gen = eval_text2img.generator(t, m, shape, n, jax.random.key(seed), **_setting(t))
        r = {}
        x = gen(sets["concept"])
        marks = np.stack([hit(row) for row in x])  # (P, N)
        r["concept_rate"] = float(marks.mean())
        grids[who] = (x, marks)
        if kind == "subject":
            o = eval_text2img.score(judge, gen(sets["ordinary"]),
                                    [(p, "ordinary") for p in sets["ordinary"]], real)  # fmt: skip
            r["ordinary_adherence"] = o["adherence"]
            r["ordinary_accuracy"] = o["accuracy"]
            r["drift"] = float(np.mean([hit(row) for row in gen(sets["drift"])]))
        s = eval_text2img.score(judge, gen([p for p, _ in standard]), standard, real)
        r["standard_adherence"] = s["adherence"]
        r["standard_accuracy"] = s["accuracy"]
        r["fd_in_judge_features"] = s["fd_in_judge_features"]
        out[who] = r
    rows = _prompt_rows(grids["base"][0], grids["tuned"][0], prompts, grids["base"][1],
                        grids["tuned"][1])  # fmt: skip
    sets["standard"] = [p for p, _ in standard]
    return {"kind": kind, "prompts": sets, **out}, rows


def _control_program(task, model, shape, controlled: bool, setting):
    graphdef = nnx.graphdef(model)

    @jax.jit
    def fn(params, ids, ctrl, key):
        cond = {"input_ids": ids, "control": ctrl} if controlled else {"input_ids": ids}
        return task.sample(nnx.merge(graphdef, params), key, cond, (ids.shape[0], *shape),
                           method=setting["method"], num_steps=setting["num_steps"],
                           guidance_scale=setting["guidance"], grid=setting["grid"])  # fmt: skip

    return fn


def eval_control(cfg, task, model, num, seed, judge, data_dir, batch=16):
    """ControlNet measures (module docstring): `num` test examples, controlled and not."""
    base_task, base_model = task.base()
    name = cfg.data.name
    real, captions, records = shapes_judge.real_images(name, "test", data_dir, num)
    layouts = {k: np.stack([np.asarray(r[k]) for r in records])
               for k in ("num_shapes", "shapes", "centers", "radii")}  # fmt: skip
    size = _shape(task, real.shape[1])[0] * task.factor
    ctrl = concepts.control_images(layouts, size, task.layout_size).astype(np.float32)
    masks = concepts.control_images(layouts, real.shape[1], task.layout_size)[..., 0]
    ids = np.asarray(task.conditioning.tokenizer(captions))
    out, samples = {}, {}
    for who, t, m, controlled in (("base", base_task, base_model, False),
                                  ("controlled", task, model, True)):  # fmt: skip
        fn = _control_program(t, m, _shape(t, real.shape[1]), controlled, _setting(t))
        params, xs = nnx.state(m), []
        for i in range(0, num, batch):
            sl = np.r_[i : i + batch] % num  # the last chunk wraps: one compiled shape
            z = fn(params, ids[sl], ctrl[sl], jax.random.fold_in(jax.random.key(seed), i))
            xs.append(np.clip(np.asarray(t.to_pixels(z)), -1.0, 1.0)[: min(batch, num - i)])
        x = np.concatenate(xs)
        samples[who] = x
        s = judge.score(x, captions)
        iou = concepts.mask_iou(x, masks)
        out[who] = {"mask_iou": float(iou.mean()), "mask_iou_median": float(np.median(iou)),
                    "adherence": float(s["adherence"]),
                    "accuracy": {k: float(v) for k, v in s["accuracy"].items()}}  # fmt: skip
    k = min(num, 8)
    rows = np.stack(
        [
            masks[:k, ..., None].repeat(3, -1) * 2.0 - 1.0,
            samples["base"][:k],
            samples["controlled"][:k],
        ]
    )  # (3, k, H, W, 3)
    iou_b, iou_c = (concepts.mask_iou(samples[w][:k], masks[:k]) for w in ("base", "controlled"))
    marks = [[True] * k, list(iou_b > 0.5), list(iou_c > 0.5)]
    grid = (rows, ["control (layout mask)", "base, no control", "ControlNet"], marks)
    return {"kind": "controlnet", "num_examples": num, **out}, grid


def evaluate(workdir, num_per_prompt=8, num_control=64, seed=0, judge_path=eval_text2img.JUDGE,
             data_dir=None, write=True, **concept) -> dict:  # fmt: skip
    """Runs the evaluation of the module docstring; returns the JSON record. `concept`:
    eval_concept's num_prompts / standard (fewer prompts, for tests)."""
    cfg = read_config(workdir)
    task = tasks.from_config(cfg)
    if not isinstance(task, finetune.FineTuneTask | control.ControlNetTask):
        raise ValueError(f"{workdir} is not a fine-tuning or ControlNet run (task {cfg.task!r})")
    data_dir = data_dir or cfg.data.get("data_dir") or None
    model, step = restore_ema(cfg, task, workdir)
    judge = shapes_judge.load(judge_path)
    if isinstance(task, control.ControlNetTask):
        result, grid = eval_control(cfg, task, model, num_control, seed, judge, data_dir)
    else:
        result, grid = eval_concept(task, model, num_per_prompt, seed, judge, data_dir, **concept)
        result["num_per_prompt"] = num_per_prompt
    result = {"checkpoint_step": int(step), "base": task.base_path, "sampler": _setting(task),
              **result}  # fmt: skip
    if write:
        stem = os.path.join(workdir, "eval_finetune")
        images.save_prompt_grid(*grid, stem + ".png")
        if isinstance(task, finetune.FineTuneTask) and task.method == "lora":
            result["lora_file"] = finetune.export_lora(workdir, os.path.join(workdir, "lora"))
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
        Workdir(workdir).log(event="eval_finetune", **{k: v for k, v in result.items()
                                                        if k != "prompts"})  # fmt: skip
    return result


def _first_batch(task, cfg) -> dict:
    """The first prepared training batch of the run's data."""
    from diffusion import train

    source = task.dataset(cfg.data)
    return task.prepare_batch(next(iter(train._pipeline(source, cfg.data.batch_size, 0))))


def training_memory(cfg, batch) -> dict:
    """Parameter counts and XLA memory analysis of one compiled training step of `cfg` on one
    device, on a prepared `batch`."""
    from diffusion import train
    from diffusion.train_state import frozen_weights, make_optimizer, state_fns

    task = tasks.from_config(cfg)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    with sharding.mesh_context(mesh):
        tx, lr = make_optimizer(cfg.optim, cfg.total_steps)
        graphdef, init_fn = state_fns(task, tx, cfg.seed)
        abstract = jax.eval_shape(init_fn)
        frozen = frozen_weights(task, cfg.seed, mesh)
        step = jax.jit(train.make_train_step(task, graphdef, tx, lr, cfg), donate_argnums=0)
        mem = step.lower(abstract, frozen, batch).compile().memory_analysis()
    nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
    out = {"method": getattr(task, "method", cfg.task),
           "trained_params": train._size(abstract["params"]), "frozen_params": train._size(frozen),
           "state_bytes": nbytes(abstract), "frozen_bytes": nbytes(frozen)}  # fmt: skip
    for k in ("argument", "output", "temp", "alias"):
        out[f"{k}_bytes"] = int(getattr(mem, f"{k}_size_in_bytes", 0))
    out["peak_bytes_estimate"] = out["argument_bytes"] + out["temp_bytes"]
    return out


def memory_comparison(workdir) -> list[dict]:
    """training_memory of the run's config and of it with finetune.method flipped (same batch);
    writes eval_finetune_memory.json."""
    cfg = read_config(workdir)
    if cfg.task != "finetune":
        raise ValueError(f"--memory compares LoRA and full fine-tuning; {workdir} is {cfg.task!r}")
    other = cfg.copy_and_resolve_references()
    other.finetune.method = "full" if cfg.finetune.method == "lora" else "lora"
    batch = _first_batch(tasks.from_config(cfg), cfg)
    rows = [training_memory(c, batch) for c in (cfg, other)]
    with open(os.path.join(workdir, "eval_finetune_memory.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if f.memory:
        rows = memory_comparison(f.workdir)
        mib = lambda b: f"{b / 2**20:.1f}"
        print(markdown_table([{"method": r["method"], "trained": r["trained_params"],
                               "frozen": r["frozen_params"], "state MiB": mib(r["state_bytes"]),
                               "temp MiB": mib(r["temp_bytes"]),
                               "peak MiB": mib(r["peak_bytes_estimate"])} for r in rows],
                             ["method", "trained", "frozen", "state MiB", "temp MiB",
                              "peak MiB"]))  # fmt: skip
        return
    r = evaluate(f.workdir, f.num_per_prompt, f.num_control, f.seed, f.judge, f.data_dir)
    whos = ("base", "controlled") if r["kind"] == "controlnet" else ("base", "tuned")
    keys = [k for k, v in r[whos[0]].items() if isinstance(v, float)]
    print(markdown_table([{"model": w, **{k: r[w][k] for k in keys}} for w in whos],
                         ["model", *keys]))  # fmt: skip


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "a finetune or controlnet training run's workdir")
    flags.DEFINE_integer("num_per_prompt", 8, "samples per prompt (LoRA, DreamBooth)")
    flags.DEFINE_integer("num_control", 64, "test examples (ControlNet)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_bool("memory", False, "LoRA vs full fine-tuning: parameters and memory")
    flags.DEFINE_string("judge", eval_text2img.JUDGE, "the shapes judge's folder")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the run's)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
