"""Training claims of experiments/reproduce.py: SD3's objectives and time densities ranked,
min-SNR weighting against training steps, latent against pixel diffusion against compute.

Same contract as reproduce_sampling.py: `claim(cfg, ctx) -> {"table", "plots", "held",
"because", "data"}`; what each measures and what "held" means is in its configs/reproduce/ file.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import scipy.stats

from diffusion import checkpoint
from diffusion.workdir import markdown_table
from experiments.reproduce_sampling import FS, fd_cell
from experiments.sweep_samplers import plot_quality

# ------------------------------------------------------------------------------ SD3 ranks


def average_ranks(rows, variants, metrics=(("fd", False), ("accuracy", True))) -> dict:
    """{variant: mean rank} over every (setting, metric): per setting (nfe_target, guidance)
    and metric, the variants are ranked 1 = best (ties share the mean rank), as SD3's Table 1
    ranks its variants per control setting and averages."""
    settings = sorted({(r["nfe_target"], r["guidance"]) for r in rows})
    ranks = {v: [] for v in variants}
    for setting in settings:
        at = {r["model"]: r for r in rows if (r["nfe_target"], r["guidance"]) == setting}
        for key, higher_better in metrics:
            vals = np.array([at[v][key] for v in variants], np.float64)
            for v, rank in zip(variants, scipy.stats.rankdata(-vals if higher_better else vals)):
                ranks[v].append(float(rank))
    return {v: float(np.mean(r)) for v, r in ranks.items()}


def sd3_objectives(cfg, ctx) -> dict:
    rows = []
    for kind, model_cfg in cfg.models.items():
        s = ctx.sweep(f"sd3_{kind}", ctx.model(model_cfg), methods=cfg.method,
                      nfes=tuple(cfg.nfes), guidance_scales=tuple(cfg.guidance_scales))  # fmt: skip
        rows += [r | {"model": cfg.variants[kind]} for r in s["rows"]]
    names = list(cfg.variants.values())
    paper_rank = {cfg.variants[k]: cfg.paper_numbers[k] for k in cfg.variants}
    lo, hi = min(cfg.nfes), max(cfg.nfes)
    avg = average_ranks(rows, names)
    fewest = average_ranks([r for r in rows if r["nfe_target"] == lo], names)
    most = average_ranks([r for r in rows if r["nfe_target"] == hi], names)
    final = {r["model"]: r for r in rows if (r["nfe_target"], r["guidance"]) == (hi, 1.0)}
    table_rows = [{"variant": v, "paper rank": paper_rank[v], "our rank": avg[v],
                   f"rank at {lo} steps": fewest[v], f"rank at {hi} steps": most[v],
                   f"FD ({hi} steps, no guidance)": fd_cell(final[v]) if v in final else "",
                   "accuracy": final[v]["accuracy"] if v in final else ""}
                  for v in sorted(names, key=avg.get)]  # fmt: skip
    paper = [paper_rank[v] for v in names]
    rho = float(scipy.stats.spearmanr(paper, [avg[v] for v in names])[0])
    table = (f"Each variant trained {cfg.models[next(iter(cfg.models))].total_steps} steps; "
             f"{cfg.method} at NFE {tuple(cfg.nfes)} x guidance {tuple(cfg.guidance_scales)}; "
             f"ranked per setting by FD in {FS} and by class accuracy, averaged (lower is "
             f"better). Spearman correlation with the paper's ranks: {rho:.2f}.\n\n"
             + markdown_table(table_rows, list(table_rows[0]), ".2f"))  # fmt: skip
    plot_quality(
        rows,
        ctx.file("sd3_objectives.png"),
        FS,
        group=("model", "guidance"),
        keys=["fd", "accuracy"],
        title="SD3 objectives (DDIM)",
    )
    best = min(names, key=avg.get)
    lognorm, uniform = "rf/lognorm(0.00, 1.00)", "rf"
    held = avg[lognorm] == min(avg.values()) and avg[uniform] > avg[lognorm]
    because = (
        f"{best} ranks best ({avg[best]:.2f}); rf/lognorm(0, 1) {avg[lognorm]:.2f}, rf "
        f"(uniform) {avg[uniform]:.2f}; Spearman correlation with the paper {rho:.2f}"
    )
    return {
        "table": table,
        "plots": ["sd3_objectives.png"],
        "held": bool(held),
        "because": because,
        "data": {"rows": rows, "avg_rank": avg, "spearman": rho},
    }


# ------------------------------------------------------------------------------ min-SNR


def speedup(plain, other):
    """(speed-up, step) at which `other` [(step, fd)] first reaches plain's final FD, linearly
    interpolated between checkpoints; (None, None) if it never does. plain: [(step, fd)]."""
    (t_end, target), prev = plain[-1], None
    for step, fd in other:
        if fd <= target:
            if prev is None:
                return t_end / step, step
            s0, frac = prev[0], (target - prev[1]) / (fd - prev[1])
            reach = s0 + frac * (step - s0)
            return t_end / reach, reach
        prev = (step, fd)
    return None, None


def min_snr(cfg, ctx) -> dict:
    rows = []
    for name, model_cfg in cfg.models.items():
        wd = ctx.model(model_cfg)
        for step in ctx.checkpoint_steps(wd):
            s = ctx.sweep(f"{name}_{step}", wd, step=step, methods=cfg.method, nfes=(cfg.nfe,),
                          guidance_scales=(cfg.guidance,))  # fmt: skip
            rows.append(s["rows"][0] | {"model": name, "train_step": step})
    curve = lambda m: [(r["train_step"], r["fd"]) for r in rows if r["model"] == m]  # noqa: E731
    factor, reach = speedup(curve("plain"), curve("min_snr_5"))
    by = {(r["model"], r["train_step"]): r for r in rows}
    table_rows = [{"step": st, "plain FD": fd_cell(by["plain", st]),
                   "plain accuracy": by["plain", st]["accuracy"],
                   "min-SNR-5 FD": fd_cell(by["min_snr_5", st]),
                   "min-SNR-5 accuracy": by["min_snr_5", st]["accuracy"]}
                  for st in sorted({r["train_step"] for r in rows})]  # fmt: skip
    shown = "never reached" if factor is None else f"{factor:.2f}x (at step {reach:.0f})"
    table = (f"{cfg.method} at NFE {cfg.nfe}, guidance {cfg.guidance:g}, FD in {FS}. Speed-up "
             f"(plain final step / step where min-SNR-5 first reaches the plain run's final "
             f"FD): {shown}; paper {cfg.paper_numbers.speedup}x.\n\n"
             + markdown_table(table_rows, list(table_rows[0]), ".3f"))  # fmt: skip
    plot_quality(
        rows,
        ctx.file("min_snr.png"),
        FS,
        x="train_step",
        group=("model",),
        keys=["fd", "accuracy"],
        title="min-SNR-5 vs plain eps objective",
    )
    held = factor is not None and factor > 1.0
    because = (f"min-SNR-5 reaches the plain objective's final FD {shown} (paper: "
               f"{cfg.paper_numbers.speedup}x)")  # fmt: skip
    return {
        "table": table,
        "plots": ["min_snr.png"],
        "held": held,
        "because": because,
        "data": {"rows": rows, "speedup": factor},
    }


# ----------------------------------------------------------------------- latent vs pixel


def train_flops_per_example(result: dict) -> float:
    """3 x forward FLOPs of one training example (network + its share of the text encoding);
    result: eval_text2img's flops_per_sample of an unguided setting (batch-1 network call)."""
    f = result["flops_per_sample"]
    return 3.0 * (f["network_call"] + f["encode"] / 2.0)


def text_curve(workdir: str, num_per_prompt: int, data_dir=None) -> list[dict]:
    """eval_text2img at every kept checkpoint, with the training compute to that step."""
    from diffusion.workdir import read_config
    from experiments import eval_text2img

    cfg = read_config(workdir)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        steps = ckpt.all_steps()
    unguided = eval_text2img.evaluate(workdir, steps[-1], 1, guidance_scale=1.0, write=False,
                                      data_dir=data_dir)  # fmt: skip
    per_step = train_flops_per_example(unguided) * cfg.data.batch_size
    rows = []
    for step in steps:
        r = eval_text2img.evaluate(workdir, step, num_per_prompt, write=False, data_dir=data_dir)
        rows.append({"train_step": step, "train_flops": per_step * step,
                     "adherence": r["adherence"], "fd": r["fd_in_judge_features"],
                     "flops_per_image": r["flops_per_sample"]["total"]})  # fmt: skip
    return rows


def compare(curves: dict, latent, pixel):
    """(held, because) from {run: [{"train_flops", "adherence"}]}: adherence of the best latent
    run against the pixel run's at the largest training compute both reached (interpolated in
    log compute); held None when a side has no run."""
    lat = [k for k in latent if curves.get(k)]
    pix = [k for k in pixel if curves.get(k)]
    if not lat or not pix:
        missing = "latent" if not lat else "pixel"
        return None, f"no {missing} run given (config workdirs)"
    at = lambda k, c: float(
        np.interp(
            np.log(c),
            np.log([r["train_flops"] for r in curves[k]]),
            [r["adherence"] for r in curves[k]],
        )
    )  # noqa: E731
    c = min(max(r["train_flops"] for r in curves[k]) for k in lat + pix)
    best = max(lat, key=lambda k: at(k, c))
    p = max(pix, key=lambda k: at(k, c))
    held = at(best, c) > at(p, c)
    return held, (f"at {c:.3g} training FLOPs {best} adheres {at(best, c):.3f} against {p}'s "
                  f"{at(p, c):.3f}")  # fmt: skip


CURVE_KEYS = ("train_step", "train_flops", "adherence", "fd", "flops_per_image")


def read_curve(path: str) -> dict:
    """A compute curve file as latent_vs_pixel writes it (<claim workdir>/<run>_curve.json):
    {"run", "workdir", "num_per_prompt", "date", "rows": [{CURVE_KEYS}]}."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"compute curve {path!r} does not exist (paths are relative to the directory the "
            "command runs in, the repository root)"
        )
    with open(path) as f:
        curve = json.load(f)
    rows = curve.get("rows") if isinstance(curve, dict) else None
    if not rows or any(k not in r for r in rows for k in CURVE_KEYS):
        raise ValueError(
            f"{path!r} is not a compute curve: expected a JSON object whose 'rows' each hold "
            f"{list(CURVE_KEYS)}, as latent_vs_pixel writes them"
        )
    return curve


def latent_vs_pixel(cfg, ctx) -> dict:
    """Each run's curve is measured from its workdir (cfg.workdirs) or, where none is given, read
    from the curve file an earlier measurement wrote (cfg.curves); either way the curve is written
    to <claim workdir>/<run>_curve.json, so an export keeps what a later quick run reads."""
    curves, rows, sources = {}, [], []
    files = cfg.get("curves") or {}
    for name in sorted(set(cfg.workdirs) | set(files)):
        wd, path = cfg.workdirs.get(name, ""), files.get(name, "")
        if wd:
            curve = {"run": name, "workdir": wd, "num_per_prompt": cfg.num_per_prompt,
                     "date": datetime.date.today().isoformat(),
                     "rows": text_curve(wd, cfg.num_per_prompt, ctx.data_dir or None)}  # fmt: skip
            sources.append(f"{name}: measured from {wd}")
        elif path:
            curve = read_curve(path)
            sources.append(f"{name}: read from {path} (measured {curve.get('date', '?')} from "
                           f"{curve.get('workdir', '?')}, {curve.get('num_per_prompt', '?')} "
                           "samples per prompt)")  # fmt: skip
        else:
            continue
        with open(ctx.file(f"{name}_curve.json"), "w") as f:
            json.dump(curve, f, indent=2)
        curves[name] = curve["rows"]
        rows += [{k: r[k] for k in CURVE_KEYS} | {"model": name} for r in curve["rows"]]
    held, because = compare(curves, cfg.latent, cfg.pixel)
    if not rows:
        return {"table": "No runs given.", "plots": [], "held": None, "because": because,
                "data": {}}  # fmt: skip
    table = ("Shapes judge's full-prompt adherence and FD in judge features of every kept "
             "checkpoint; training compute = 3 x forward FLOPs x batch x steps. Curves: "
             + "; ".join(sources) + ".\n\n"
             + markdown_table(rows, ["model", *CURVE_KEYS], ".3g"))  # fmt: skip
    plot_quality(
        rows,
        ctx.file("latent_vs_pixel.png"),
        "judge features",
        x="train_flops",
        group=("model",),
        keys=["adherence", "fd"],
        title="quality vs training compute",
    )
    return {
        "table": table,
        "plots": ["latent_vs_pixel.png"],
        "held": held,
        "because": because,
        "data": {"rows": rows},
    }


CLAIMS = {"sd3_objectives": sd3_objectives, "min_snr": min_snr,
          "latent_vs_pixel": latent_vs_pixel}  # fmt: skip
