"""Prompt adherence of a shapes text-to-image run, read by the shapes judge (GenEval-style).

    python -m experiments.eval_text2img --workdir /tmp/shapes_ldm_unet [--step N | --steps all]
        [--num_per_prompt 8] [--guidance_scale G] [--method M --num_steps K]

Restores the run's EMA weights, draws num_per_prompt samples for each evaluation prompt with the
run's sampler and guidance (or the given ones), decodes latents with the run's VAE, and lets the
judge (diffusion/metrics/shapes_judge.py; committed in benchmarks/results/shapes_judge) read
them: full-prompt adherence (every attribute right) and per-attribute accuracy, separately for
prompts that are and are not the caption of some training image ("unseen": new combinations of
colours, shapes and relations), and the FD in judge features to the real test split (with the
real-vs-real FD at the same sample count for scale; it is not FID). Writes eval_text2img.json,
eval_text2img.png (one row per prompt, green / red frame = adherent or not) and a metrics.jsonl
line; `--steps all` scores every kept checkpoint and plots adherence against training step;
`--vae_ceiling` judges real test images after a round trip through the run's VAE (with their own
captions): the most a latent denoiser on this VAE could score.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from diffusion import data, images, tasks
from diffusion.data import shapes
from diffusion.metrics import shapes_judge
from diffusion.train_state import restore_ema
from diffusion.workdir import Workdir, markdown_table, read_config

JUDGE = "benchmarks/results/shapes_judge"


def eval_prompts(train_captions, n_single=16, n_seen=8, n_unseen=8, seed=1):
    """Fixed evaluation prompts drawn from the shapes generator (an index stream no split uses):
    n_single one-shape captions, n_seen two-shape captions that caption some training image and
    n_unseen that caption none. Returns [(prompt, group)], group in single / seen / unseen."""
    train, want = set(train_captions), {"single": n_single, "seen": n_seen, "unseen": n_unseen}
    out, i = [], 0
    while any(want.values()) and i < 100_000:
        ex = shapes.make_example(np.random.default_rng([seed, 9, i]), 32)
        group = "single" if ex["num_shapes"] == 1 else "seen"
        group = "unseen" if group == "seen" and ex["caption"] not in train else group
        if want[group] and ex["caption"] not in {p for p, _ in out}:
            out.append((ex["caption"], group))
            want[group] -= 1
        i += 1
    return out


def train_captions(name: str, data_dir=None) -> list[str]:
    source = data.load_source(name, "train", data_dir)
    return [source[i]["caption"].decode() for i in range(len(source))]


def prompt_program(task, model, shape, num_per_prompt, *, method, num_steps, guidance, grid,
                   **options):  # fmt: skip
    """fn(params, ids (L,), key) -> num_per_prompt samples of `shape` (h, w, c) for one prompt's
    token ids, jitted: one compiled program serves every prompt. `options` go to the sampler."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def fn(params, ids_p, key):
        cond = {"input_ids": jnp.broadcast_to(ids_p, (num_per_prompt, ids_p.shape[-1]))}
        return task.sample(nnx.merge(graphdef, params), key, cond, (num_per_prompt, *shape),
                           method=method, num_steps=num_steps, guidance_scale=guidance,
                           grid=grid, **options)  # fmt: skip

    return fn


def generator(task, model, shape, num_per_prompt, rng, *, method, num_steps, guidance, grid):
    """gen(prompts) -> (len(prompts), num_per_prompt, H, W, 3) images in [-1, 1] from samples
    of `shape` (h, w, c: latents or pixels), prompt p drawn with fold_in(rng, p); one compiled
    program serves every prompt of every call."""
    params = nnx.state(model)
    fn = prompt_program(task, model, tuple(shape), num_per_prompt, method=method,
                        num_steps=num_steps, guidance=guidance, grid=grid)  # fmt: skip

    def gen(prompts):
        ids = np.asarray(task.conditioning.tokenizer(prompts))  # (P, L)
        out = []
        for p in range(len(prompts)):
            z = fn(params, ids[p], jax.random.fold_in(rng, p))
            out.append(np.clip(np.asarray(task.to_pixels(z)), -1.0, 1.0))
        return np.stack(out)

    return gen


def generate(task, model, shape, prompts, num_per_prompt, rng, **setting):
    """generator(...)(prompts): the images of one prompt list."""
    return generator(task, model, shape, num_per_prompt, rng, **setting)(prompts)


def _flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def flops_per_sample(task, model, shape, setting) -> dict:
    """XLA's FLOP count of generating one image: prompt encoding (prompt and empty prompt), NFE
    guided network evaluations (batch 2 when guided), the VAE decode (latent models)."""
    from diffusion import samplers

    guided = setting["guidance_scale"] != 1.0
    ids = jnp.asarray(task.conditioning.tokenizer(["a red circle at the center"]))  # (1, L)
    null = jax.tree.map(lambda n: n[None], task.conditioning.null())
    encode = lambda i: task.conditioning.kwargs(model, {"input_ids": i})
    kw = encode(ids)
    kws = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), kw, encode(null["input_ids"]))
    kws = kws if guided else kw
    x = jnp.zeros((2 if guided else 1, *shape))
    net = task.conditioning.denoiser(model)
    call = lambda x, k: net(x, timestep=jnp.full((x.shape[0],), 500.0), **k)
    nfe = samplers.nfe(setting["method"], setting["num_steps"])
    out = {"encode": _flops(encode, jnp.concatenate([ids, null["input_ids"]])),
           "network_call": _flops(call, x, kws), "nfe": nfe}  # fmt: skip
    out["decode"] = _flops(task.to_pixels, jnp.zeros((1, *shape))) if task.latents else 0.0
    out["total"] = out["encode"] + nfe * out["network_call"] + out["decode"]
    return out


def score(judge, samples, prompts, real) -> dict:
    """Judge scores of (P, N, H, W, 3) samples for prompts [(prompt, group)]: adherence overall,
    per group and per prompt, per-attribute accuracy, FD in judge features to `real` images (and
    real vs real at the same count, for scale)."""
    text = [p for p, _ in prompts]
    flat = samples.reshape(-1, *samples.shape[2:])  # (P N, H, W, 3)
    scores = judge.score(flat, [t for t in text for _ in range(samples.shape[1])])
    adherent = np.asarray([r["adherent"] for r in scores["records"]]).reshape(len(text), -1)
    groups = {}
    for i, (_, g) in enumerate(prompts):
        groups.setdefault(g, []).append(i)
    ref, n = judge.features(real), len(flat)
    fd = lambda x, r: float(shapes_judge.fd_in_judge_features(judge, x, r))
    return {
        "adherence": float(scores["adherence"]),
        "adherence_by_group": {g: float(adherent[i].mean()) for g, i in groups.items()},
        "accuracy": {k: float(v) for k, v in scores["accuracy"].items()},
        "fd_in_judge_features": fd(flat, ref),
        "fd_in_judge_features_real_vs_real": fd(real[n : 2 * n], ref[:n]) if len(real) >= 2 * n
        else None,
        "prompts": [{"prompt": p, "group": g, "adherence": float(a.mean())}
                    for (p, g), a in zip(prompts, adherent)],
        "adherent": adherent,
    }  # fmt: skip


def evaluate(
    workdir,
    step=None,
    num_per_prompt=8,
    seed=0,
    guidance_scale=None,
    method=None,
    num_steps=None,
    judge_path=JUDGE,
    data_dir=None,
    prompts=None,
    write=True,
):
    # fmt: skip
    """Runs the evaluation described in the module docstring; returns the JSON record."""
    cfg = read_config(workdir)
    task = tasks.from_config(cfg)
    if not isinstance(task, tasks.DiffusionTask) or task.conditioning.name != "text":
        raise ValueError(f"{workdir} is not a text-to-image run (task={cfg.task!r})")
    if not cfg.data.name.startswith("shapes"):
        raise ValueError(f"the judge reads shapes only; {workdir} trained on {cfg.data.name!r}")
    data_dir = data_dir or cfg.data.get("data_dir") or None
    model, step = restore_ema(cfg, task, workdir, step)
    sc = task.sampling
    setting = {"method": method or sc.method, "num_steps": num_steps or sc.num_steps,
               "guidance_scale": sc.guidance_scale if guidance_scale is None else guidance_scale,
               "grid": sc.grid}  # fmt: skip
    prompts = prompts or eval_prompts(train_captions(cfg.data.name, data_dir))
    text = [p for p, _ in prompts]
    m = cfg.model.config
    shape = (m.sample_size, m.sample_size, m.in_channels)
    samples = generate(task, model, shape, text, num_per_prompt, jax.random.key(seed),
                       method=setting["method"], num_steps=setting["num_steps"],
                       guidance=setting["guidance_scale"], grid=setting["grid"])  # fmt: skip
    real = shapes_judge.real_images(cfg.data.name, "test", data_dir)[0]
    scores = score(shapes_judge.load(judge_path), samples, prompts, real)
    adherent = scores.pop("adherent")
    result = {"checkpoint_step": int(step), "sampler": setting, "num_prompts": len(text),
              "num_per_prompt": num_per_prompt, **scores,
              "flops_per_sample": flops_per_sample(task, model, shape, setting)}  # fmt: skip
    if write:
        stem = os.path.join(workdir, "eval_text2img")
        images.save_prompt_grid(samples, text, adherent, stem + ".png")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
        Workdir(workdir).log(event="eval_text2img", **{k: v for k, v in result.items()
                                                        if k != "prompts"})  # fmt: skip
    return result


def vae_ceiling(workdir, num_images=512, judge_path=JUDGE, data_dir=None) -> dict:
    """The judge on real test images and on their round trips through the run's VAE, each with
    its own caption: the adherence a perfect latent denoiser could reach with this VAE. Writes
    eval_vae_ceiling.json."""
    cfg = read_config(workdir)
    task = tasks.from_config(cfg)
    if getattr(task, "latents", None) is None:
        raise ValueError(f"{workdir} is not a latent run (no latents.vae)")
    data_dir = data_dir or cfg.data.get("data_dir") or None
    real, captions, _ = shapes_judge.real_images(cfg.data.name, "test", data_dir, num_images)
    space = task.latents
    rec = np.concatenate([np.asarray(space.decode(space.encode(real[i : i + 256])))
                          for i in range(0, len(real), 256)])  # fmt: skip
    judge = shapes_judge.load(judge_path)
    out = {"num_images": len(real)}
    for name, x in (("real", real), ("vae_round_trip", np.clip(rec, -1.0, 1.0))):
        s = judge.score(x, captions)
        out[name] = {"adherence": float(s["adherence"]),
                     "accuracy": {k: float(v) for k, v in s["accuracy"].items()}}  # fmt: skip
    with open(os.path.join(workdir, "eval_vae_ceiling.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def curve(workdir, num_per_prompt=4, **kw) -> list[dict]:
    """eval at every kept checkpoint (fewer samples each); writes eval_text2img_curve.{json,png}."""
    import matplotlib.pyplot as plt

    from diffusion import checkpoint

    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        steps = ckpt.all_steps()
    rows = [evaluate(workdir, s, num_per_prompt, write=False, **kw) for s in steps]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [r["adherence"] for r in rows], "o-", label="all prompts")
    for g in ("single", "seen", "unseen"):
        ax.plot(steps, [r["adherence_by_group"].get(g, np.nan) for r in rows], ".--", label=g)
    ax.set(xlabel="training step", ylabel="full-prompt adherence (judge)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "eval_text2img_curve.png"), dpi=120)
    with open(os.path.join(workdir, "eval_text2img_curve.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the table
    f = flags.FLAGS
    kw = dict(seed=f.seed, guidance_scale=f.guidance_scale, method=f.method,
              num_steps=f.num_steps, judge_path=f.judge, data_dir=f.data_dir)  # fmt: skip
    if f.vae_ceiling:
        r = vae_ceiling(f.workdir, judge_path=f.judge, data_dir=f.data_dir)
        print(markdown_table([{"images": k, "adherence": r[k]["adherence"], **r[k]["accuracy"]}
                              for k in ("real", "vae_round_trip")],
                             ["images", "adherence", *r["real"]["accuracy"]]))  # fmt: skip
        return
    if f.steps == "all":
        rows = curve(f.workdir, f.num_per_prompt, **kw)
        print(markdown_table([{"step": r["checkpoint_step"], "adherence": r["adherence"],
                               **r["adherence_by_group"]} for r in rows],
                             ["step", "adherence", "single", "seen", "unseen"]))  # fmt: skip
        return
    r = evaluate(f.workdir, f.step, f.num_per_prompt, **kw)
    rows = [{"attribute": k, "accuracy": v} for k, v in r["accuracy"].items()]
    print(markdown_table(rows, ["attribute", "accuracy"]))
    print(f"step {r['checkpoint_step']}, {r['sampler']}: adherence {r['adherence']:.3f} "
          f"{r['adherence_by_group']}; FD in judge features {r['fd_in_judge_features']:.1f} "
          f"(real vs real {r['fd_in_judge_features_real_vs_real']})")  # fmt: skip


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    flags.DEFINE_string("workdir", None, "a shapes text-to-image training run's workdir")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
    flags.DEFINE_string("steps", None, "'all': every kept checkpoint, and the curve")
    flags.DEFINE_integer("num_per_prompt", 8, "samples per prompt")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_float("guidance_scale", None, "CFG scale (default: the run's)")
    flags.DEFINE_string("method", None, "sampler (default: the run's)")
    flags.DEFINE_integer("num_steps", None, "sampler steps (default: the run's)")
    flags.DEFINE_bool("vae_ceiling", False, "judge real test images through the run's VAE")
    flags.DEFINE_string("judge", JUDGE, "the shapes judge's folder")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: the run's)")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
