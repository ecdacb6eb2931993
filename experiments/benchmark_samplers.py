"""Benchmark samplers against an exact Gaussian-mixture target (the project's main job).

    python -m experiments.benchmark_samplers --config configs/samplers/gmm.py --workdir DIR

See configs/samplers/gmm.py for what it measures and writes.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from diffusion import analytic, metrics, samplers, schedules
from diffusion.workdir import Workdir, markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def parse_methods(spec: str) -> list[tuple[str, dict]]:
    """'ddim,dpm_solver:order=2' -> [('ddim', {}), ('dpm_solver', {'order': 2})]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *opts = item.split(":")
        kw = {}
        for o in opts:
            k, v = o.split("=")
            kw[k] = int(v) if v.lstrip("-").isdigit() else float(v) if "." in v else v
        samplers.get(name)  # unknown names fail early, listing the valid ones
        out.append((name, kw))
    return out


def label(name: str, kw: dict) -> str:
    return name + "".join(f"[{k}={v}]" for k, v in kw.items())


def steps_for_nfe(name: str, kw: dict, target: int, grid_fn) -> int | None:
    """Largest num_steps whose exact NFE on grid_fn(num_steps) is <= target (None if even 1 step
    needs more). NFE never decreases with num_steps, so a bisection over 1..target finds it
    with O(log target) grids (each new grid size compiles the schedule's interpolation)."""
    fits = lambda n: samplers.nfe(name, n, grid=grid_fn(n), **kw) <= target  # noqa: E731
    if target < 1 or not fits(1):
        return None
    lo, hi = 1, target  # fits(lo); the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def run_one(gmm, schedule, cfg, name, kw, num_steps, x_T, rng, t_end):
    """(samples, NFE the run reports, compile seconds, median sampling milliseconds)."""
    ts = samplers.time_grid(schedule, cfg.grid, num_steps, t_end=t_end)
    denoise = lambda x, t: gmm.denoise(x, t, schedule)
    fn = jax.jit(
        lambda x, r: samplers.sample(
            denoise, x, schedule, method=name, num_steps=num_steps, rng=r, grid=ts,
            return_info=True, **kw,
        )
    )  # fmt: skip
    t0 = time.perf_counter()
    compiled = fn.lower(x_T, rng).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(cfg.timing_repeats):
        t0 = time.perf_counter()
        out, info = jax.block_until_ready(compiled(x_T, rng))
        times.append(time.perf_counter() - t0)
    return np.asarray(out), int(info["nfe"]), compile_s, 1e3 * statistics.median(times)


def convergence_orders(rows):
    """Least-squares slope of -log(error) vs log(NFE) per deterministic method."""
    orders = {}
    for lab in dict.fromkeys(r["method"] for r in rows if not r["stochastic"]):
        pts = [
            (r["nfe"], r["rms_error"]) for r in rows if r["method"] == lab and r["rms_error"] > 0
        ]
        if len(pts) >= 2:
            nfe, err = np.log(np.array(pts)).T
            orders[lab] = float(-np.polyfit(nfe, err, 1)[0])
    return orders


def compile_scaling(gmm, schedule, cfg, x_T, rng, t_end):
    rows = []
    for name in filter(None, cfg.compile_check.split(",")):
        secs = {}
        for n in (10, 200):
            _, _, secs[n], _ = run_one(gmm, schedule, cfg, name, {}, n, x_T, rng, t_end)
        rows.append(
            {
                "method": name,
                "compile_s@10": secs[10],
                "compile_s@200": secs[200],
                "ratio": secs[200] / secs[10],
            }
        )
    return rows


def plot_errors(rows, path):
    fig, ax = plt.subplots(figsize=(7, 5))
    labels = dict.fromkeys(r["method"] for r in rows if not r["stochastic"])
    for i, lab in enumerate(labels):
        pts = sorted((r["nfe"], r["rms_error"]) for r in rows if r["method"] == lab)
        style = "-" if i < 10 else "--"  # the default colour cycle repeats after 10
        ax.loglog(*zip(*pts), style, marker="o", label=lab)
    ax.set(xlabel="NFE", ylabel="RMS error vs reference ODE solution", title="Error vs NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(gmm, exact, samples: dict, path):
    """2-D data: scatter per method; images: first 8 samples of each method as a grid."""
    n = len(samples) + 1
    cols = min(n, 4)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.2 * ((n + cols - 1) // cols))
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, (title, x) in zip(axes, [("exact samples", exact), *samples.items()]):
        if gmm.event_shape == (2,):
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
            ax.set(xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal")
        else:
            tiles = np.concatenate(list(x[:8, ..., 0]), axis=1)  # (H, 8W)
            ax.imshow(tiles, cmap="gray", vmin=-1.2, vmax=1.2)
            ax.axis("off")
        ax.set_title(title, fontsize=8)
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(cfg) -> list[tuple[str, dict, int | None]]:
    """(method, options, NFE target) jobs: every method at every NFE in cfg.nfes; adaptive methods
    choose their steps, so one run per (rtol, atol) in cfg.tolerances, target None."""
    jobs = [(m, kw, nfe) for m, kw in parse_methods(cfg.methods) for nfe in cfg.nfes]
    adaptive = parse_methods(cfg.adaptive)
    return jobs + [
        (m, kw | dict(rtol=r, atol=a), None) for m, kw in adaptive for r, a in cfg.tolerances
    ]


def distribution_metrics(gmm, out, exact, swd_rng) -> dict:
    """Sliced W2 to exact samples and mean exact log-likelihood of the samples."""
    return {
        "swd": float(metrics.sliced_wasserstein(jnp.asarray(out), exact, swd_rng)),
        "loglik": float(jnp.mean(gmm.log_prob(jnp.asarray(out)))),
    }


def benchmark(cfg, workdir: str) -> dict:
    wd = Workdir(workdir, cfg)
    jax.config.update("jax_enable_x64", bool(cfg.x64))
    gmm = analytic.make_gmm(cfg.data)
    schedule = schedules.get(
        cfg.schedule, **({"shift": cfg.shift} if cfg.schedule == "rectified_flow" else {})
    )
    t_end = schedule.t_min if cfg.t_end == "t_min" else float(cfg.t_end)
    rng = jax.random.key(cfg.seed)
    shape = (cfg.num_samples, *gmm.event_shape)
    x_T = samplers.prior(schedule, jax.random.fold_in(rng, 1), shape, jnp.result_type(float))
    if gmm.means.shape[0] == 1:
        reference = np.asarray(gmm.ode_map(x_T, schedule.t_max, t_end, schedule))
    else:
        reference = analytic.reference_ode_solution(gmm, x_T, schedule.t_max, t_end, schedule)
    exact = np.asarray(gmm.sample(jax.random.fold_in(rng, 2), cfg.num_samples))
    swd_rng = jax.random.fold_in(rng, 3)
    baseline = float(
        metrics.sliced_wasserstein(
            gmm.sample(jax.random.fold_in(rng, 4), cfg.num_samples), exact, swd_rng
        )
    )
    rows, scatter = [], {}
    grid_fn = lambda n: samplers.time_grid(schedule, cfg.grid, n, t_end=t_end)
    for name, kw, target in tqdm(sweep(cfg), desc="benchmark", unit="run"):
        num_steps = 1 if target is None else steps_for_nfe(name, kw, target, grid_fn)
        if num_steps is None:
            continue
        out, nfe, compile_s, ms = run_one(
            gmm, schedule, cfg, name, kw, num_steps, x_T, jax.random.fold_in(rng, 5), t_end
        )
        tol = {k: kw[k] for k in ("rtol", "atol") if target is None}
        row = {
            "method": label(name, {k: v for k, v in kw.items() if k not in tol}),
            "nfe_target": target,
            **tol,
            "num_steps": num_steps,
            "nfe": nfe,
            "stochastic": samplers.get(name).stochastic,
            "rms_error": float(np.sqrt(np.mean((out - reference) ** 2))),
            **distribution_metrics(gmm, out, exact, swd_rng),
            "compile_s": compile_s,
            "sample_ms": ms,
        }
        rows.append(row)
        wd.log(kind="run", **row)
        if target == cfg.scatter_nfe:
            scatter[f"{row['method']} NFE={row['nfe']}"] = out
    orders = convergence_orders(rows)
    comp = compile_scaling(gmm, schedule, cfg, x_T, rng, t_end)
    wd.log(kind="orders", **orders)
    for r in comp:
        wd.log(kind="compile_scaling", **r)
    summary = {
        "rows": rows,
        "orders": orders,
        "compile": comp,
        "swd_exact_baseline": baseline,
        "loglik_exact": float(jnp.mean(gmm.log_prob(jnp.asarray(exact)))),
    }
    report = write_report(wd, cfg, summary)
    print(report)
    plot_errors(rows, wd.file("error_vs_nfe.png"))
    plot_samples(gmm, exact, dict(list(scatter.items())[:7]), wd.file("samples.png"))
    return summary


def write_report(wd: Workdir, cfg, s: dict) -> str:
    cols = ["method", "nfe", "num_steps", "rtol", "rms_error", "swd", "loglik", "compile_s"]
    cols += ["sample_ms"]
    order_rows = [{"method": k, "order": v} for k, v in s["orders"].items()]
    text = "\n\n".join(
        [
            f"# Sampler benchmark: {cfg.data}, schedule {cfg.schedule}, grid {cfg.grid}",
            f"{cfg.num_samples} samples; reference: "
            + (
                "closed-form Gaussian ODE map"
                if cfg.data == "gaussian2d"
                else "scipy DOP853 (rtol 1e-10)"
            )
            + f". Exact-vs-exact sliced W2 baseline: {s['swd_exact_baseline']:.4f}; "
            f"exact samples' mean log-likelihood: {s['loglik_exact']:.4f}.",
            markdown_table(s["rows"], cols),
            "## Empirical convergence order (slope of log RMS error vs log NFE)",
            markdown_table(order_rows, ["method", "order"], ".2f"),
            "## Compile time vs number of steps (one XLA program per run)",
            markdown_table(
                s["compile"], ["method", "compile_s@10", "compile_s@200", "ratio"], ".3f"
            ),
        ]
    )
    wd.write_report(text + "\n")
    return text


def main(argv):
    del argv
    benchmark(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Flags are defined only when run as a script, so experiments modules import together.
    config_flags.DEFINE_config_file("config", None, "configs/samplers/*.py[:variants]")
    flags.DEFINE_string("workdir", None, "output directory")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
